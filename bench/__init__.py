"""Throughput benchmark for fastrelay; run `python bench/run.py --help`."""
