"""Facts about the machine and the libraries, recorded with every run."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

LIBRARIES = ("websockets", "picows", "aiohttp", "uvloop", "numpy", "psutil")


@dataclass
class Machine:
    cpu: str  # model name
    cores: int | None
    memory_bytes: int | None
    system: str
    kernel: str
    python: str
    versions: dict[str, str | None]  # library -> version; None: not importable

    def describe(self) -> str:
        return "%s, %s cores, %s GiB, %s %s, Python %s" % (
            self.cpu,
            self.cores,
            round((self.memory_bytes or 0) / 2**30),
            self.system,
            self.kernel,
            self.python,
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for mod in LIBRARIES:
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: report as such
            versions[mod] = None
    try:
        from fastrelay._version import __version__ as fastrelay_version

        versions["fastrelay"] = fastrelay_version
    except Exception:  # noqa: BLE001
        versions["fastrelay"] = None
    return versions


def machine() -> Machine:
    try:
        mem: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        memory_bytes=mem,
        system=platform.system(),
        kernel=platform.release(),
        python=platform.python_version(),
        versions=_versions(),
    )
