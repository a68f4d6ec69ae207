"""halb: a high-availability load-balancer cluster toolkit."""

__version__ = "0.1.0"

# The L7 hot path may be compiled (Cython): this finder picks the extension or the .py source
# for those modules (HALB_NO_EXTENSIONS, stale builds). See halb/_ext.py.
from . import _ext

_ext.install()
