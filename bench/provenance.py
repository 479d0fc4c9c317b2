"""Which fastrelay code a run measured: the commit, the git tree of
fastrelay/, and files of it that differ from the commit. Taken at the start
and at the end of a run, so a run that spans a change of the code under test
says so."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from .servers import ROOT


@dataclass
class CodeState:
    commit: str | None  # HEAD; None outside a git checkout
    fastrelay_tree: str | None  # git tree id of fastrelay/ at HEAD
    fastrelay_changes: list[str]  # uncommitted changes under fastrelay/ (porcelain lines)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state() -> CodeState:
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", "fastrelay")
    return CodeState(
        commit=_git("rev-parse", "HEAD"),
        fastrelay_tree=_git("rev-parse", "HEAD:fastrelay"),
        fastrelay_changes=changes.splitlines() if changes else [],
    )


def changed(start: CodeState, end: CodeState | None) -> bool:
    """True if fastrelay/ differed between the start and the end of a run."""
    if end is None:
        return False
    return (start.fastrelay_tree, start.fastrelay_changes) != (
        end.fastrelay_tree,
        end.fastrelay_changes,
    )


def describe(start: CodeState, end: CodeState | None) -> str:
    """One line for RESULTS.md: the code measured, and any caveat."""
    if start.commit is None:
        return "code: not a git checkout"
    line = "code: commit %s" % start.commit[:12]
    if start.fastrelay_changes:
        line += " with uncommitted changes in fastrelay/ (%s)" % ", ".join(
            c[3:] for c in start.fastrelay_changes
        )
    if changed(start, end):
        line += (
            "; fastrelay/ CHANGED during the run (commit %s at the end): "
            "its figures mix code versions" % ((end and end.commit) or "?")[:12]
        )
    return line
