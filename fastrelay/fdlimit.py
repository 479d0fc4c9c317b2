"""The open-files limit: every client is a file descriptor, and the default
soft limit (often 1024) would refuse connections long before the machine
runs out of anything else."""

from __future__ import annotations

import resource

# Descriptors the process needs besides its clients: listeners, the metrics
# endpoint, logs, the event loop's own, a backplane connection.
RESERVED = 32


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # some platforms cap it lower than the hard limit: keep what we have
    return soft


def shortfall(limit: int, max_connections: int) -> str | None:
    """One line for the log when the limit cannot hold limits.max_connections
    clients, else None."""
    if limit == resource.RLIM_INFINITY or not max_connections:
        return None
    if limit - RESERVED >= max_connections:
        return None
    return (
        f"open files limit is {limit}: about {max(limit - RESERVED, 0)} clients fit, fewer "
        f"than limits.max_connections ({max_connections}); raise it (ulimit -n, LimitNOFILE=)"
    )
