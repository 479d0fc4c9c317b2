"""Which fastrelay code a run measures.

The working tree may change while a benchmark runs (a long run spans other
people's commits and rebuilds). So the harness copies the fastrelay package,
compiled module included, once at the start and runs every fastrelay server
of the run from that copy: all its fastrelay figures come from one version
of the code, recorded here as the commit plus any uncommitted changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from .servers import ROOT


@dataclass
class CodeState:
    commit: str | None  # HEAD; None outside a git checkout
    fastrelay_tree: str | None  # git tree id of fastrelay/ at HEAD
    fastrelay_changes: list[str]  # uncommitted changes under fastrelay/ (porcelain lines)

    def describe(self) -> str:
        """One line for RESULTS.md."""
        if self.commit is None:
            return "code: not a git checkout"
        line = "code: fastrelay/ as at commit %s" % self.commit[:12]
        if self.fastrelay_changes:
            line += " plus uncommitted changes to %s" % ", ".join(
                c[3:] for c in self.fastrelay_changes
            )
        return line + ", copied at the start of the run"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # rstrip only: a porcelain line starts with a space when the index is clean.
    return done.stdout.rstrip() if done.returncode == 0 else None


def code_state() -> CodeState:
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", "fastrelay")
    return CodeState(
        commit=_git("rev-parse", "HEAD"),
        fastrelay_tree=_git("rev-parse", "HEAD:fastrelay"),
        fastrelay_changes=changes.splitlines() if changes else [],
    )


def _build_leftovers(directory: str, names: list[str]) -> list[str]:
    # Bytecode caches and Cython's generated C are not needed to run.
    return [n for n in names if n == "__pycache__" or n.endswith(".c")]


def freeze_fastrelay(into: str) -> CodeState:
    """Copy the fastrelay package into `into` (a server started with `into`
    as its working directory imports the copy) and say what was copied."""
    state = code_state()
    shutil.copytree(
        os.path.join(ROOT, "fastrelay"), os.path.join(into, "fastrelay"), ignore=_build_leftovers
    )
    return state
