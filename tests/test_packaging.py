"""Packaging contracts that are quick enough for every test run.

The slow half (build the sdist, the wheel from the sdist, install it in a
fresh venv, run this suite against it) is .ci/wheel-test.sh and cibuildwheel's
test-command. These tests also run there, against the installed wheel, so
none of them may assume a source checkout unless it says so and skips.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastrelay

PACKAGE_DIR = Path(fastrelay.__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent


def test_missing_compiled_module_fails_loudly(tmp_path):
    """Without fastrelay._frames, `import fastrelay` raises an ImportError
    that names the module and says there is no pure-Python fallback."""
    copy = tmp_path / "fastrelay"
    copy.mkdir()
    for source in PACKAGE_DIR.glob("*.py"):  # the pure-Python files, no .so/.pyx/.c
        shutil.copy(source, copy / source.name)
    assert not list(copy.glob("_frames*"))
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "print('ORIGIN', importlib.util.find_spec('fastrelay').origin)\n"
        "try:\n"
        "    import fastrelay\n"
        "except ImportError as exc:\n"
        "    print('IMPORTERROR:', exc)\n"
        "    sys.exit(0)\n"
        "print('IMPORTED ANYWAY')\n"
        "sys.exit(1)\n"
    )
    # -I: ignore PYTHONPATH and the user site; -S: no site-packages, so neither
    # an installed fastrelay nor the editable-install finder can answer first.
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    message = done.stdout
    assert f"ORIGIN {copy / '__init__.py'}" in message, message
    assert "IMPORTERROR:" in message
    assert "fastrelay._frames" in message
    assert "no pure-python fallback" in message.lower()


def test_version_is_single_sourced():
    from fastrelay._version import __version__

    assert fastrelay.__version__ == __version__
    assert importlib.metadata.version("fastrelay") == fastrelay.__version__


def test_console_script_is_declared():
    entry_points = importlib.metadata.distribution("fastrelay").entry_points
    scripts = {ep.name: ep.value for ep in entry_points if ep.group == "console_scripts"}
    assert scripts.get("fastrelay") == "fastrelay.cli:main"


def test_runtime_dependencies_are_declared():
    requires = importlib.metadata.requires("fastrelay") or []
    runtime = {
        re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requires if "extra ==" not in r
    }
    assert {"uvloop", "pyyaml", "prometheus-client"} <= runtime


def test_demo_page_is_real_package_data():
    """fastrelay/demo/index.html is a symlink in git; what the package holds
    (editable or installed) must be the page itself, not a dangling link or
    a link text."""
    from importlib import resources

    page = resources.files("fastrelay").joinpath("demo/index.html").read_bytes()
    assert page.lstrip().lower().startswith(b"<!doctype html")
    if (REPO / "example" / "index.html").exists():
        assert page == (REPO / "example" / "index.html").read_bytes()


@pytest.mark.checkout
def test_no_generated_c_tracked_in_git():
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    generated = [
        p
        for p in tracked
        if p.endswith((".c", ".so", ".html"))
        and p.startswith("fastrelay/")
        and p != "fastrelay/demo/index.html"
    ]
    assert generated == [], f"generated files tracked in git: {generated}"
    assert "fastrelay/_frames.pyx" in tracked
