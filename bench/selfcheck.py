"""Shows that the benchmark catches a relay that loses, duplicates or
corrupts messages: runs `bench/run.py --quick` (fan-out only) against
bench/peers/faulty_relay.py in each fault mode and expects each run to fail
verification with the matching finding; then against the same relay with
no fault and expects success.

    python bench/selfcheck.py        # exit 0 when every expectation holds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    # (fault, every, what the JSON must show)
    ("drop", 3000, "loss"),
    ("duplicate", 3000, "duplicate or reorder"),
    ("corrupt", 3000, "malformed"),
    ("drop", 0, None),  # no fault: must verify
]


def run_case(fault: str, every: int, tmp: str) -> tuple[int, dict]:
    out = os.path.join(tmp, "%s-%d.json" % (fault, every))
    cmd = "%s bench/peers/faulty_relay.py --port {port} --fault %s --every %d" % (
        sys.executable,
        fault,
        every,
    )
    argv = [
        sys.executable,
        "bench/run.py",
        "--quick",
        "--workloads",
        "fanout",
        "--reps",
        "1",
        "--servers",
        "faulty",
        "--server-cmd",
        "faulty=" + cmd,
        "--json",
        out,
    ]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if not os.path.exists(out):
        sys.stdout.write(r.stdout + r.stderr)
        return r.returncode, {}
    with open(out) as f:
        return r.returncode, json.load(f)


def main() -> int:
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fault, every, expect in CASES:
            rc, data = run_case(fault, every, tmp)
            verdicts = [r["verdict"] for r in data.get("runs", [])]
            loss = sum(v["loss"] for v in verdicts)
            errors = " | ".join(e for v in verdicts for e in v["errors"])
            if expect is None:
                ok = rc == 0 and loss == 0 and not errors
            elif expect == "loss":
                ok = rc == 1 and loss > 0
            else:
                ok = rc == 1 and expect in errors
            bad += not ok
            print(
                "%-4s fault=%-9s every=%-5d exit=%d loss=%d %s"
                % ("ok" if ok else "FAIL", fault, every, rc, loss, errors[:160]),
                flush=True,
            )
    print("selfcheck: %s" % ("all expectations held" if not bad else "%d case(s) failed" % bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
