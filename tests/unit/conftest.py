"""Dual-mode unit tests for the compiled hot path (halb/_ext.py).

A test module that sets ``DUAL_MODULE = "halb.proxy.http_head"`` (one of ``halb._ext.COMPILED``)
and uses the ``dual_module`` fixture runs each test twice: ``[compiled]`` with the module as halb
loads it (the Cython extension; skipped when this process does not run it compiled, which
tests/unit/test_extensions.py turns into a failure) and ``[source]`` with its ``.py`` loaded
under a private name. For ``[source]`` the names the test module imported from that module are
rebound to the source module's for the test's duration.
"""

from __future__ import annotations

import importlib

import pytest

from halb import _ext


@pytest.fixture(params=["compiled", "source"])
def dual_module(request, monkeypatch):
    name = request.module.DUAL_MODULE
    loaded = importlib.import_module(name)
    if request.param == "compiled":
        if _ext.status()[name] != _ext.COMPILED_STATUS:
            pytest.skip(f"{name} is not compiled here: {_ext.status()[name]}")
        return loaded
    src = _ext.load_source(name)
    assert src is not loaded and src.__file__.endswith(".py")
    namespace = vars(request.module)
    rebound = [attr for attr, value in list(namespace.items())
               if not attr.startswith("__") and getattr(loaded, attr, None) is value]
    assert rebound, f"{request.module.__name__} imports nothing from {name}"
    for attr in rebound:
        monkeypatch.setitem(namespace, attr, getattr(src, attr))
    return src
