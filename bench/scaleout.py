"""What the backplane and the workers cost and buy, with bench/run.py's load.

Starts a private redis-server (127.0.0.1, free port, stopped by PID at the
end) and runs bench/run.py with three fastrelay setups side by side, same
load, same run:

- `fastrelay`     one process, no backplane (the default);
- `fr-backplane`  one process with backplane.url: every member is local, so
                  this is the backplane's pure cost (publish once per turn,
                  read our own packets back and drop them);
- `fr-workers2`   server.workers: 2 with the backplane: the kernel spreads
                  each room's members over two processes, and every message
                  crosses Redis to reach the other half.

The figures to read: fan-out R=100 server CPU per delivery, fastrelay vs
fr-backplane (target: at most 1.3x); fan-out R=1000 deliveries/s and CPU per
delivery, fr-workers2 vs fr-backplane; latency p50/p99 at 1000 msg/s,
fr-workers2 (half the sampled members are on the other process) vs
fastrelay. Server CPU includes the workers and the supervisor, not
redis-server. On a 2-core machine the load generator and redis-server share
the cores with the workers: pinning is off for fr-workers2's sake (--no-pin).

    python bench/scaleout.py [--before DIR] [bench/run.py options, e.g. --reps 3 --workloads fanout]

`--before DIR` adds `bp-before`: fr-backplane's setup run from another
checkout (built in place), for an A/B of a change side by side; name it in
`--servers` to include it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backplane_clients import start_redis  # noqa: E402

BASE = {
    "server": {"host": "127.0.0.1", "port": 0},
    "metrics": {"enabled": False},
    "logging": {"level": "warn"},
}


def config(workdir: Path, name: str, extra: dict[str, object]) -> str:
    path = workdir / f"{name}.yaml"
    data = {**BASE, **extra}
    data["server"] = {**BASE["server"], **extra.get("server", {})}  # type: ignore[dict-item]
    path.write_text(yaml.safe_dump(data))
    return str(path)


def main(argv: list[str]) -> int:
    before = None
    if argv[:1] == ["--before"]:
        before, argv = argv[1], argv[2:]
    workdir = Path(tempfile.mkdtemp(prefix="fastrelay-scaleout-"))
    redis_proc, port = start_redis(workdir)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        setups = {
            "fr-backplane": {"backplane": {"url": url}},
            "fr-workers2": {"backplane": {"url": url}, "server": {"workers": 2}},
        }
        python = sys.executable
        commands = [
            f"{name}={python} -m fastrelay --config-file {config(workdir, name, extra)}"
            for name, extra in setups.items()
        ]
        if before is not None:
            # env -C: `python -m` puts the working directory first on sys.path.
            commands.append(
                f"bp-before=env -C {before} PYTHONPATH={before} {python} -m fastrelay "
                f"--config-file {workdir / 'fr-backplane.yaml'}"
            )
        args = [python, str(HERE / "run.py"), "--no-pin"]
        args += ["--servers", "fastrelay," + ",".join(setups)]
        for command in commands:
            args += ["--server-cmd", command]
        args += argv or ["--workloads", "fanout,latency", "--reps", "1"]
        # Its own result files: never overwrite the main run's RESULTS.md.
        if "--json" not in args:
            args += ["--json", str(HERE / "results" / "scaleout.json")]
        if "--markdown" not in args:
            args += ["--markdown", str(HERE / "results" / "SCALEOUT.md")]
        print("+", " ".join(args), flush=True)
        return subprocess.run(args, cwd=HERE.parent, env=dict(os.environ)).returncode
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
