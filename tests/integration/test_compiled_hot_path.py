"""The compiled L7 hot path end to end (the import-time switch is in
tests/unit/test_extensions.py):

- a real halbd serves HTTP through an http listener with the compiled modules and with
  ``HALB_NO_EXTENSIONS=1`` (the pure-Python ones), and the process runs what it claims: the
  extensions are mapped into it, or not (/proc/PID/maps); routing (a host route) and head
  rewriting (X-Forwarded-For) run in the listed modules;
- setup.py's build is optional: without a working C compiler or without Cython it warns and
  builds pure Python, removing extensions an earlier in-place build left; with
  ``HALB_NO_EXTENSIONS=1`` it builds a pure-Python wheel.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from halb import _ext
from tests.helpers import Backends, Halbd, free_port, http_get, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _mapped_extensions(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines()
            if line.split()[-1].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))}


@pytest.mark.parametrize("no_ext", [False, True], ids=["compiled", "HALB_NO_EXTENSIONS"])
def test_halbd_serves_http(no_ext, tmp_path):
    if not no_ext and _ext.disabled():
        pytest.skip(f"{_ext.ENV} is set for this test run")
    if not no_ext and _ext.status()[_ext.COMPILED[0]] != "compiled":
        pytest.fail(f"the hot path is not compiled here: {_ext.status()}; run ./dev setup")
    d = tmp_path
    with Backends(["web1", "api1"], logdir=d) as bk:
        port = free_port()
        cfg = write_config(d, f'''
[node]
name = "lb1"
state_dir = "{d}"

[[pools]]
name = "web"
  [[pools.backends]]
  name = "web1"
  address = "{bk.http["web1"]}"

[[pools]]
name = "api"
  [[pools.backends]]
  name = "api1"
  address = "{bk.http["api1"]}"

[[listeners]]
name = "http"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
  [[listeners.routes]]
  pool = "api"
  host = "api.test"
''')
        env = {_ext.ENV: "1"} if no_ext else {_ext.ENV: ""}
        with Halbd(cfg, env=env) as node:
            node.wait_port(port)
            for host, backend in (("www.test", "web1"), ("api.test", "api1"), ("www.test", "web1")):
                status, headers, body = http_get(f"http://127.0.0.1:{port}/x", headers={
                    "Host": host, "X-Forwarded-For": "192.0.2.9"})
                assert (status, headers.get("X-Backend")) == (200, backend), (host, headers)
                seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
                assert seen["x-forwarded-for"] == "192.0.2.9, 127.0.0.1", seen
            mapped = {Path(p).name.split(".")[0] for p in _mapped_extensions(node.pid)
                      if "/halb/" in p}
            leaves = {n.rsplit(".", 1)[1] for n in _ext.COMPILED}
            assert node.alive(), node.output()[-2000:]
            if no_ext:
                assert not mapped & leaves, mapped
            else:
                assert leaves <= mapped, mapped
            assert "extension_fallback" not in node.output()


# -- the optional build ----------------------------------------------------------------------

def _project_copy(tmp: Path, *, with_extensions: bool = False) -> Path:
    """What the build reads (as the Containerfile copies it); ``with_extensions``: also the
    in-place extensions of this tree's editable install."""
    ctx = tmp / "src"
    ctx.mkdir()
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / f, ctx / f)
    ignore = ["__pycache__", "*.c"] + ([] if with_extensions else ["*.so"])
    shutil.copytree(ROOT / "halb", ctx / "halb", ignore=shutil.ignore_patterns(*ignore))
    return ctx


def _wheel(ctx: Path, out: Path, **env: str) -> tuple[Path, str]:
    """Build a wheel as the Containerfile does (with this venv's setuptools and Cython)."""
    e = {k: v for k, v in os.environ.items() if k not in (_ext.ENV, "CC", "PYTHONPATH")}
    e.update(env)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                        "--no-build-isolation", "--disable-pip-version-check",
                        "--wheel-dir", str(out), str(ctx)],
                       capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [whl] = out.glob("halb-*.whl")
    return whl, r.stdout + r.stderr


def _so_in(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return [n for n in z.namelist() if n.endswith(".so")]


def test_without_a_working_compiler_the_build_warns_and_installs_pure_python(tmp_path):
    whl, out = _wheel(_project_copy(tmp_path), tmp_path / "out", CC="false")
    assert "halb's L7 hot path is NOT compiled" in out, out[-3000:]
    assert _so_in(whl) == []
    with zipfile.ZipFile(whl) as z:
        assert all(f"{m.replace('.', '/')}.py" in z.namelist() for m in _ext.COMPILED)


def test_without_cython_the_build_warns_and_installs_pure_python(tmp_path):
    fake = tmp_path / "no-cython" / "Cython"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no Cython here (test)')\n")
    whl, out = _wheel(_project_copy(tmp_path), tmp_path / "out",
                      PYTHONPATH=str(fake.parent))
    assert "NOT compiled: Cython is not installed" in out, out[-3000:]
    assert _so_in(whl) == []


def test_no_extensions_at_build_time_makes_a_pure_wheel(tmp_path):
    whl, out = _wheel(_project_copy(tmp_path), tmp_path / "out", **{_ext.ENV: "1"})
    assert whl.name.endswith("-py3-none-any.whl") and _so_in(whl) == [], whl.name
    assert "HALB_NO_EXTENSIONS is set" in out


def test_a_failed_in_place_rebuild_removes_the_old_extensions(tmp_path):
    """An editable install builds in place; when a later rebuild fails, the extensions of the
    earlier build must go (else they would run, stale, or hide that the build fell back)."""
    ctx = _project_copy(tmp_path, with_extensions=True)
    before = sorted(p.name for p in (ctx / "halb").rglob("*.so"))
    assert len(before) == len(_ext.COMPILED), before
    e = {k: v for k, v in os.environ.items() if k not in (_ext.ENV, "PYTHONPATH")}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=ctx, capture_output=True, text=True, timeout=300,
                       env={**e, "CC": "false"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT compiled" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in (ctx / "halb").rglob("*.so")) == []
