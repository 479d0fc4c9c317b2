"""fastrelay: a WebSocket broadcast relay with a compiled frame codec."""

from ._version import __version__

try:
    from . import _frames  # noqa: F401  (the product: never run without it)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "fastrelay's compiled module fastrelay._frames is missing or broken "
        f"({exc}). Install a wheel, or build it with `pip install .` "
        "(needs a C compiler); there is no pure-Python fallback."
    ) from exc

__all__ = ["__version__"]
