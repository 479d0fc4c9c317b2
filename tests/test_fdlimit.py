"""The relay raises its open-files limit at start and says, in one line,
when the limit still cannot hold limits.max_connections clients."""

from __future__ import annotations

import resource
import sys

from fastrelay import fdlimit
from relay_process import start_relay


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert fdlimit.raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_shortfall_is_one_line_naming_both_numbers() -> None:
    assert fdlimit.shortfall(1024, 0) is None
    assert fdlimit.shortfall(100_000, 50_000) is None
    line = fdlimit.shortfall(1024, 50_000)
    assert line is not None and "\n" not in line
    assert "1024" in line and "50000" in line


def test_the_relay_warns_at_start_when_the_limit_is_too_low(tmp_path) -> None:
    # The relay runs under a hard limit of 512 (set in the child only, before
    # fastrelay starts), too low for 5000 clients.
    command = [
        sys.executable,
        "-c",
        "import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)); "
        "runpy.run_module('fastrelay', run_name='__main__')",
    ]
    relay = start_relay(tmp_path, {"limits": {"max_connections": 5000}}, command=command)
    try:
        relay.expect("stderr", r"\[WARN\] open files limit is 512: about 480 clients fit")
    finally:
        assert relay.stop() == 0
