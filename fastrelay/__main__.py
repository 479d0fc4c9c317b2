"""`python -m fastrelay`: the same entry point as the `fastrelay` command."""

from .cli import main

raise SystemExit(main())
