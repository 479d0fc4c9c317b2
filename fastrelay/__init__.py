"""fastrelay: a WebSocket broadcast relay with a compiled frame codec."""

from importlib.util import find_spec

from ._version import __version__

# The compiled codec is the product: there is no pure-Python fallback, so a
# missing build fails here, loudly, rather than running something slow.
if find_spec("fastrelay._frames") is None:
    raise ImportError(
        "fastrelay's compiled module fastrelay._frames is missing: install a "
        "wheel, or build it with `pip install .` (needs a C compiler); "
        "there is no pure-Python fallback."
    )
from . import _frames  # noqa: E402,F401

__all__ = ["__version__"]
