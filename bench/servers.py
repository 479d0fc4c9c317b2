"""Starting and stopping the servers under test.

A server is a command line; the harness starts it, pinned to the server CPU,
waits for its "listening on ws://HOST:PORT/" line on stdout (no sleeps), and
stops it by PID in a finally block: SIGTERM, then SIGKILL after a timeout.
Only processes started here are ever signalled.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "bench", "peers")
READY_RE = re.compile(r"listening on wss?://(\[[^\]]+\]|[^\s:/]+):(\d+)")


@dataclass
class ServerSpec:
    name: str
    kind: str  # "fastrelay", "peer" or "command"
    template: str = ""  # peer script or command template
    port_zero: bool = True  # server accepts port 0 and prints the real port
    cwd: str = ROOT  # fastrelay: the directory holding the copy of the package to run
    # wss workloads: (cert_file, key_file) to serve TLS with. A command
    # template takes them as {cert} and {key}.
    tls: Optional[tuple[str, str]] = None

    def argv(self, port: int, tmpdir: str) -> list[str]:
        """The command line for a port; fastrelay's config file goes in tmpdir."""
        if self.kind == "peer":
            tls = ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]] if self.tls else []
            return [
                sys.executable,
                os.path.join(PEERS, self.template),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *tls,
            ]
        if self.kind == "fastrelay":
            path = os.path.join(tmpdir, "fastrelay-bench-%d.yaml" % port)
            tls = ""
            if self.tls:
                tls = "  tls:\n    enabled: true\n    cert_file: %s\n    key_file: %s\n" % self.tls
            with open(path, "w") as f:
                f.write(
                    "server:\n  host: 127.0.0.1\n  port: %d\n%s"
                    "metrics:\n  enabled: false\n"
                    "logging:\n  level: warn\n" % (port, tls)
                )
            return [sys.executable, "-m", "fastrelay", "--config-file", path]
        cmd = self.template.replace("{port}", str(port))
        if self.tls:
            if "{cert}" not in cmd or "{key}" not in cmd:
                raise ServerError(
                    "%s: a wss workload needs a command that takes {cert} and {key}" % self.name
                )
            cmd = cmd.replace("{cert}", self.tls[0]).replace("{key}", self.tls[1])
        return shlex.split(cmd)


BUILTIN = {
    "fastrelay": ServerSpec("fastrelay", "fastrelay"),
    # The control: fastrelay's batching in Python (see peers/batched_relay.py).
    "batched": ServerSpec("batched", "peer", "batched_relay.py"),
    "websockets": ServerSpec("websockets", "peer", "websockets_relay.py"),
    "picows": ServerSpec("picows", "peer", "picows_relay.py"),
    "aiohttp": ServerSpec("aiohttp", "peer", "aiohttp_relay.py"),
}


def fastrelay_available(cwd: str) -> Optional[str]:
    """None if `python -m fastrelay` run in cwd can be expected to work, else why not."""
    r = subprocess.run(
        [sys.executable, "-c", "import fastrelay.server"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return lines[-1] if lines else "import fastrelay.server failed"
    return None


def free_port() -> int:
    # Only for commands that cannot take port 0: a small window in which
    # another process could grab the port, acceptable on a benchmark box.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preexec(cpu: Optional[int]):
    def fn() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return fn


class ServerError(Exception):
    pass


# Servers started and not yet stopped: a last-resort cleanup at exit, should
# an error ever skip a run's own `finally`. Only these PIDs are signalled.
_LIVE: set = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@dataclass
class ServerProcess:
    spec: ServerSpec
    cpu: Optional[int]
    proc: Optional[subprocess.Popen] = None
    port: int = 0
    stdout_tail: deque = field(default_factory=lambda: deque(maxlen=40))
    stderr_path: str = ""
    _tmpdir: Optional[tempfile.TemporaryDirectory] = None
    last_stderr: list = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        # fastrelay and the peers take port 0 and print the port they got.
        port = 0 if self.spec.port_zero else free_port()
        tmpdir = tempfile.TemporaryDirectory(prefix="fastrelay-bench-")
        self._tmpdir = tmpdir
        argv = self.spec.argv(port, tmpdir.name)
        self.stderr_path = os.path.join(tmpdir.name, "stderr-%d.log" % port)
        err = open(self.stderr_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=_preexec(self.cpu),
                # Own session: a Ctrl-C on the terminal reaches the harness
                # only, which then stops its servers in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerError("%s: cannot start %r: %s" % (self.spec.name, argv, exc)) from exc
        finally:
            err.close()
        _LIVE.add(self.proc)
        lines: queue.Queue = queue.Queue()

        def pump(stream, tail: deque) -> None:
            # Keeps reading stdout for the server's whole life so that a
            # chatty server never blocks on a full pipe.
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                tail.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(
            target=pump, args=(self.proc.stdout, self.stdout_tail), daemon=True
        ).start()
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise ServerError(
                    "%s: no 'listening on ws://...' line within %.0fs%s"
                    % (self.spec.name, timeout, self._diag())
                ) from None
            if line is None:
                self.proc.wait(10)
                raise ServerError(
                    "%s exited with code %s before listening%s"
                    % (self.spec.name, self.proc.returncode, self._diag())
                )
            m = READY_RE.search(line)
            if m:
                self.port = int(m.group(2))
                if self.port == 0:
                    raise ServerError("%s printed port 0: %r" % (self.spec.name, line))
                return self

    def _diag(self) -> str:
        out = list(self.stdout_tail)[-5:]
        try:
            with open(self.stderr_path, "rb") as f:
                err = f.read()[-2000:].decode("utf-8", "replace").strip().splitlines()[-8:]
        except OSError:
            err = []
        parts = []
        if out:
            parts.append("stdout: " + " | ".join(out))
        if err:
            parts.append("stderr: " + " | ".join(err))
        return ("\n    " + "\n    ".join(parts)) if parts else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, n: int = 8) -> list[str]:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()[-n:]
        except OSError:
            return []

    def _descendants(self, proc: subprocess.Popen) -> list:
        """Processes the server started itself (a --server-cmd may be a
        wrapper such as `sh -c`); they are ours to stop as well."""
        if psutil is None:
            return []
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            kids = self._descendants(proc)
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    rc = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait(10)
            else:
                rc = proc.returncode
            _LIVE.discard(proc)
            if kids:
                for k in kids:
                    try:
                        k.terminate()
                    except psutil.Error:
                        pass
                _, alive = psutil.wait_procs(kids, timeout=timeout)
                for k in alive:
                    try:
                        k.kill()
                    except psutil.Error:
                        pass
        self.last_stderr = self.stderr_tail()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        return rc
