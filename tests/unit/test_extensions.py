"""The compiled (Cython) L7 hot path and its fallbacks (halb/_ext.py, setup.py).

- Here (gcc, Python's headers and Cython are installed by ./dev) the listed modules are compiled
  and loaded: this fails when the build silently fell back to the slow pure-Python modules.
- ``HALB_NO_EXTENSIONS=1`` loads the .py sources (a fresh interpreter per case).
- A stale build (a .py or .pxd newer than its extension, in a temporary copy of the package, never
  in the real tree) loads the sources of every listed module and warns once, naming the module
  and ``./dev setup``; an installed wheel (no setup.py beside halb) is not checked that way.
- ``halbd --version`` says which one runs.
The unit tests of http_head and routing run against both variants (tests/unit/conftest.py); a
real halbd serving HTTP either way is in tests/integration/test_http_extensions.py.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from halb import _ext

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXT_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)

# what a fresh interpreter reports: each listed module's file, status() and the warnings
PROBE = """
import json, importlib
import halb._ext as e
files = {n: importlib.import_module(n).__file__ for n in e.COMPILED}
print(json.dumps({"halb": __import__("halb").__file__, "files": files, "status": e.status()}))
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (_ext.ENV, "PYTHONPATH")}
    env.update(extra)
    return env


def probe(cwd: Path = ROOT, **env: str) -> tuple[dict, str]:
    """(what PROBE printed, its stderr), run with the package found first in ``cwd``."""
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                       cwd=cwd, env=_env(PYTHONPATH=str(cwd), **env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_the_hot_path_is_compiled_and_loaded():
    """CI must not silently run the slow path: ./dev installs gcc, libc6-dev and Cython, and
    `pip install -e .` builds the extensions in place."""
    if _ext.disabled():
        pytest.skip(f"{_ext.ENV} is set for this test run")
    st = _ext.status()
    assert st == {n: "compiled" for n in _ext.COMPILED}, \
        f"the L7 hot path is not compiled: {st}; run ./dev setup (a C compiler, Python's " \
        "headers and Cython are needed; pip prints setup.py's warning with -v)"
    for name in _ext.COMPILED:
        mod = importlib.import_module(name)
        assert mod.__file__.endswith(EXT_SUFFIXES), mod.__file__
        assert Path(mod.__file__).parent == ROOT.joinpath(*name.split(".")[:-1])
    data, err = probe()
    assert set(data["status"].values()) == {"compiled"} and not err, err
    assert all(f.endswith(EXT_SUFFIXES) for f in data["files"].values()), data


def test_setup_py_builds_exactly_the_listed_modules():
    """setup.py reads halb._ext.COMPILED (with ast, without importing halb); each entry is a
    module with a .py source in this tree."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    ns: dict = {"Path": Path, "ast": ast, "HERE": ROOT}
    exec(compile(ast.Module([funcs["compiled_modules"]], []), "setup.py", "exec"), ns)
    assert ns["compiled_modules"]() == _ext.COMPILED
    assert len(set(_ext.COMPILED)) == len(_ext.COMPILED)
    for name in _ext.COMPILED:
        assert ROOT.joinpath(*name.split(".")).with_suffix(".py").is_file(), name


@pytest.mark.parametrize("value,disabled", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_no_extensions_switch(value, disabled):
    data, err = probe(**{_ext.ENV: value})
    assert not err, err
    if disabled:
        assert data["status"] == {n: "source (HALB_NO_EXTENSIONS)" for n in _ext.COMPILED}
        for name, f in data["files"].items():
            assert f == str(ROOT.joinpath(*name.split(".")).with_suffix(".py")), (name, f)
    elif not _ext.disabled() and _ext.status()[_ext.COMPILED[0]] == "compiled":
        assert set(data["status"].values()) == {"compiled"}, data


def _copy(tmp_path: Path, *, checkout: bool = True) -> Path:
    """A copy of the package (with its built extensions) in tmp_path; with setup.py beside it
    when ``checkout`` (a source tree), without (like an installed wheel)."""
    if not all(_ext._paths(n)[2] for n in _ext.COMPILED):
        pytest.fail(f"the extensions are not built here ({_ext.status()}); run ./dev setup")
    shutil.copytree(ROOT / "halb", tmp_path / "halb",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if checkout:
        shutil.copy2(ROOT / "setup.py", tmp_path / "setup.py")
    return tmp_path


def _newer_than_ext(path: Path, ext: Path) -> None:
    t = ext.stat().st_mtime + 5
    if not path.exists():
        path.write_text("# an empty augmenting .pxd\n")
    os.utime(path, (t, t))


def test_a_copy_of_the_built_package_runs_compiled(tmp_path):
    """The control for the stale-build cases below: unchanged, the copy loads its extensions."""
    base = _copy(tmp_path)
    data, err = probe(base)
    assert data["halb"] == str(base / "halb" / "__init__.py")
    assert set(data["status"].values()) == {"compiled"} and not err, (data, err)
    assert all(f.startswith(str(base)) and f.endswith(EXT_SUFFIXES)
               for f in data["files"].values()), data


@pytest.mark.parametrize("which", [".py", ".pxd"])
def test_stale_build_loads_the_sources_and_warns(tmp_path, which):
    base = _copy(tmp_path)
    stale = "halb.proxy.http_head"
    py = base.joinpath(*stale.split(".")).with_suffix(".py")
    ext = next(py.parent.glob(py.stem + ".cpython-*.so"))
    _newer_than_ext(py.with_suffix(which), ext)
    data, err = probe(base)
    # all of them: a compiled http.py would refuse http_head's pure-Python classes
    assert data["status"] == {n: "source (stale build)" for n in _ext.COMPILED}, data
    for name, f in data["files"].items():
        assert f == str(base.joinpath(*name.split(".")).with_suffix(".py")), (name, f)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert stale in lines[0] and "./dev setup" in lines[0] and "newer" in lines[0], err
    assert "halb.proxy.routing" not in lines[0]


def test_an_installed_wheel_is_not_judged_by_mtimes(tmp_path):
    """pip writes a wheel's files in archive order (http.cpython-*.so before http.py) with the
    current time: without setup.py beside halb, a newer .py is not a stale build."""
    base = _copy(tmp_path, checkout=False)
    for py in (base / "halb" / "proxy").glob("*.py"):
        _newer_than_ext(py, next(py.parent.glob(py.stem + ".cpython-*.so"), py))
    data, err = probe(base)
    assert set(data["status"].values()) == {"compiled"} and not err, (data, err)


def test_a_partial_build_loads_all_sources_and_warns(tmp_path):
    base = _copy(tmp_path)
    gone = "halb.proxy.routing"
    for so in base.joinpath(*gone.split(".")[:-1]).glob("routing.cpython-*.so"):
        so.unlink()
    data, err = probe(base)
    assert data["status"] == {n: "source (not built)" for n in _ext.COMPILED}, data
    assert len(err.splitlines()) == 1 and gone in err and "./dev setup" in err, err


def test_nothing_built_is_quiet(tmp_path):
    base = _copy(tmp_path)
    for so in (base / "halb").rglob("*.so"):
        so.unlink()
    data, err = probe(base)
    assert data["status"] == {n: "source (not built)" for n in _ext.COMPILED} and not err, err


def test_the_stale_warning_is_a_json_log_line_in_halbd(tmp_path):
    """Once halbd has set up its logging, the warning is one of its JSON records."""
    base = _copy(tmp_path)
    py = base / "halb" / "proxy" / "http.py"
    _newer_than_ext(py, next(py.parent.glob("http.cpython-*.so")))
    code = ("from halb import log; log.setup('lb1', 'info'); import halb.proxy.http as m; "
            "print(m.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=base, env=_env(PYTHONPATH=str(base)))
    assert r.returncode == 0 and r.stdout.strip() == str(py), r.stdout + r.stderr
    [line] = r.stderr.splitlines()
    rec = json.loads(line)
    assert (rec["level"], rec["part"], rec["event"]) == ("warning", "ext", "extension_fallback")
    assert "halb.proxy.http" in rec["detail"] and rec["rebuild"] == "./dev setup"


@pytest.mark.parametrize("env,expect", [
    ({}, "L7 hot path: compiled"),
    ({_ext.ENV: "1"}, "L7 hot path: source (HALB_NO_EXTENSIONS)"),
])
def test_halbd_version_says_whether_the_hot_path_is_compiled(env, expect):
    if not env and _ext.disabled():
        pytest.skip(f"{_ext.ENV} is set for this test run")
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--version"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=_env(**env))
    assert r.returncode == 0, r.stderr
    from halb import __version__
    assert r.stdout.strip() == f"halbd {__version__} ({expect})", r.stdout + r.stderr


def test_summary_lists_mixed_states(monkeypatch):
    st = {"halb.proxy.http": "compiled", "halb.proxy.routing": "source (not built)"}
    monkeypatch.setattr(_ext, "status", lambda: st)
    assert _ext.summary() == "L7 hot path: http compiled, routing source (not built)"


def test_load_source_is_the_py_under_a_private_name():
    src = _ext.load_source("halb.proxy.routing")
    assert src.__name__ == "halb.proxy._source_routing" and src.__file__.endswith("routing.py")
    assert _ext.load_source("halb.proxy.routing") is src
    assert src.Router is not importlib.import_module("halb.proxy.routing").Router
    with pytest.raises(ValueError):
        _ext.load_source("halb.config")


def test_the_build_products_are_ignored_by_git():
    for path in ("halb/proxy/http.c", "halb/proxy/http.cpython-311-x86_64-linux-gnu.so"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        if r.returncode == 128:
            pytest.skip("not a git checkout")
        assert r.returncode == 0, f"{path} is not ignored by .gitignore"


def test_fresh_process_decides_once():
    """status() before and after the import agree (one decision per process)."""
    code = ("import halb._ext as e; a = e.status(); import halb.proxy.http; "
            "assert e.status() == a, (a, e.status()); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
