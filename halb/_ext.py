"""The optional compiled (Cython) build of the L7 hot path, and the switch that falls back.

The modules in ``COMPILED`` are plain Python files that Cython can also compile ("pure Python
mode": a ``.pxd`` next to a ``.py`` adds C types, the ``.py`` stays the source and runs as is).
``setup.py`` reads ``COMPILED`` from this file (with ``ast``, without importing halb) and
builds one extension per module when Cython and a C compiler are there; without them, or with
``HALB_NO_EXTENSIONS=1`` at build time, halb installs as pure Python.

At run time ``install()`` (called by ``halb/__init__.py``) puts a finder first on
``sys.meta_path`` that decides, once per process, where the listed modules come from:

- ``HALB_NO_EXTENSIONS=1`` (any value but empty or ``0``): the ``.py`` sources;
- a listed module without a built extension for this interpreter: the sources ("not built");
- in a source checkout (``setup.py`` beside the ``halb`` directory: an editable install,
  whose extensions are built in place), a ``.py`` or ``.pxd`` newer than its built extension
  (edited, not rebuilt): the sources, and one warning line on stderr naming the module and the
  rebuild command ("stale build"). Not in an installed wheel: pip writes its files in archive
  order with the current time, so there a ``.py`` is always a little newer than its ``.so``;
- otherwise the extensions ("compiled").

All or nothing: the compiled modules ``cimport`` each other's classes (``http`` uses
``http_head``'s ``Request`` as a C type), and a compiled module refuses a pure-Python class
where it was built against the extension's. So one module that cannot be compiled sends every
listed module to its source.

``status()`` says what was (or will be) loaded, ``summary()`` is the one line ``halbd
--version`` prints, and ``load_source(name)`` imports the pure-Python variant of a listed module
under a private name (the unit tests run against both variants).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# The modules compiled by setup.py: the L7 proxy's per-request path. One list, read by
# setup.py with ast, so keep it a literal tuple of strings.
COMPILED = (
    "halb.model",
    "halb.balance",
    "halb.metrics",
    "halb.proxy.http",
    "halb.proxy.http_head",
    "halb.proxy.routing",
)

ENV = "HALB_NO_EXTENSIONS"
REBUILD = "./dev setup"  # (in a source checkout; it reruns `pip install -e .`)

COMPILED_STATUS = "compiled"
SOURCE_ENV = f"source ({ENV})"
SOURCE_STALE = "source (stale build)"
SOURCE_NOT_BUILT = "source (not built)"

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))  # .../halb
_decision: dict[str, tuple[str, str]] | None = None  # name -> (status, file to load)


def disabled(environ=os.environ) -> bool:
    """True when ``HALB_NO_EXTENSIONS`` asks for the pure-Python modules."""
    return environ.get(ENV, "").strip() not in ("", "0")


def _paths(name: str) -> tuple[str, str, str | None]:
    """(.py, .pxd, built extension for this interpreter or None) of a listed module."""
    base = os.path.join(_PKG_DIR, *name.split(".")[1:])
    ext = next((base + s for s in importlib.machinery.EXTENSION_SUFFIXES
                if os.path.isfile(base + s)), None)
    return base + ".py", base + ".pxd", ext


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _source_checkout() -> bool:
    """halb runs from a source tree (setup.py beside it), not from an installed wheel."""
    return os.path.isfile(os.path.join(os.path.dirname(_PKG_DIR), "setup.py"))


def _warn(text: str) -> None:
    """One line on stderr: a JSON log record when halbd has set up logging, else plain."""
    import logging
    if logging.getLogger("halb").handlers:
        from .log import get_logger
        get_logger("ext").warning("extension_fallback", detail=text, rebuild=REBUILD)
    else:
        sys.stderr.write(f"halb: warning: {text}; rebuild with `{REBUILD}`\n")


def _decide() -> dict[str, tuple[str, str]]:
    global _decision
    if _decision is not None:
        return _decision
    found = {name: _paths(name) for name in COMPILED}
    if disabled():
        reason = SOURCE_ENV
    else:
        missing = [n for n, (_, _, ext) in found.items() if ext is None]
        stale = [n for n, (py, pxd, ext) in found.items()
                 if ext is not None and max(_mtime(py), _mtime(pxd)) > _mtime(ext)
                 and _source_checkout()]
        if missing and len(missing) < len(found):  # a partial build: some modules were built
            _warn(f"{', '.join(missing)}: not compiled while {len(found) - len(missing)} of "
                  f"the other hot-path modules are; running the Python sources of all")
        if stale:
            _warn(f"{', '.join(stale)}: the .py or .pxd is newer than the compiled extension; "
                  "running the Python sources (slower)")
        reason = SOURCE_NOT_BUILT if missing else SOURCE_STALE if stale else COMPILED_STATUS
    _decision = {name: (reason, ext if reason == COMPILED_STATUS else py)
                 for name, (py, _, ext) in found.items()}
    return _decision


class _Finder:
    """First on sys.meta_path: the listed modules come from the file ``_decide`` chose."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in COMPILED:
            return None
        _, filename = _decide()[fullname]
        if not os.path.isfile(filename):  # e.g. no .py shipped: leave it to the default finders
            return None
        return importlib.util.spec_from_file_location(fullname, filename)

    @classmethod
    def invalidate_caches(cls) -> None:
        pass


def install() -> None:
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


def status() -> dict[str, str]:
    """Each listed module: "compiled", "source (HALB_NO_EXTENSIONS)", "source (stale build)" or
    "source (not built)". For a module already imported, what its file is."""
    out = {}
    for name, (reason, _) in _decide().items():
        mod = sys.modules.get(name)
        loaded = getattr(mod, "__file__", None) if mod is not None else None
        if loaded and loaded.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            out[name] = COMPILED_STATUS
        elif loaded and reason == COMPILED_STATUS:  # imported past the finder (not expected)
            out[name] = SOURCE_NOT_BUILT
        else:
            out[name] = reason
    return out


def summary() -> str:
    """``L7 hot path: compiled`` (or the one source reason), or each module's status."""
    st = status()
    kinds = set(st.values())
    if len(kinds) == 1:
        return f"L7 hot path: {kinds.pop()}"
    return "L7 hot path: " + ", ".join(f"{n.rsplit('.', 1)[1]} {s}" for n, s in st.items())


def load_source(name: str):
    """The pure-Python variant of a listed module, imported from its .py under a private name
    (``halb.proxy._source_http_head``), whatever the finder loads for the public name."""
    if name not in COMPILED:
        raise ValueError(f"{name} is not one of the compiled modules {COMPILED}")
    parent, _, leaf = name.rpartition(".")
    private = f"{parent}._source_{leaf}"
    if private in sys.modules:
        return sys.modules[private]
    py, _, _ = _paths(name)
    spec = importlib.util.spec_from_file_location(
        private, py, loader=importlib.machinery.SourceFileLoader(private, py))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[private] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[private]
        raise
    return mod
