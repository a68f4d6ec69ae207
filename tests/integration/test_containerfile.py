"""The Containerfile, tested without a container engine (none runs on these machines).

What it does is replayed here step by step: the build stage's sources exist, the wheel it
builds (`pip wheel --no-deps`) builds from exactly those sources, installs into a fresh venv
made the way the image makes it (`venv --copies`), the entrypoint (`halbd`) and healthcheck
(`halbctl`) commands exist there and run, and `halbd --check` passes on every config it copies.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Containerfile ends inside a continued line"
    return out


def stages(instrs):
    """[(from_args, [instructions])] per build stage."""
    result = []
    for ins, args in instrs:
        if ins == "FROM":
            result.append((args, []))
        else:
            assert result, f"{ins} before the first FROM"
            result[-1][1].append((ins, args))
    return result


def exec_form(args: str) -> list[str]:
    v = json.loads(args)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v), args
    return v


@pytest.fixture(scope="module")
def instrs():
    return parse(CONTAINERFILE.read_text())


def test_parser_handles_continuations_and_comments():
    got = parse("# c\nFROM a AS b\nRUN x \\\n  # inner comment\n && y\n\nCMD [\"z\"]\n")
    assert got == [("FROM", "a AS b"), ("RUN", "x && y"), ("CMD", '["z"]')]


def test_structure(instrs):
    st = stages(instrs)
    assert len(st) == 2, "multi-stage: build, then run"
    (b_from, build), (r_from, run) = st
    assert b_from.endswith(" AS build") and "python:3.11-slim" in b_from
    assert "python:3.11-slim" in r_from
    runs = " ".join(a for i, a in build if i == "RUN")
    assert "pip wheel --no-deps" in runs and "venv --copies /opt/halb" in runs
    assert ("COPY", "--from=build /opt/halb /opt/halb") in run
    users = [a for i, a in run if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    text = CONTAINERFILE.read_text()
    assert "NET_ADMIN" in text and "NET_RAW" in text, "capabilities are documented"
    assert "setcap cap_net_admin,cap_net_raw+ep /opt/halb/bin/python3.11" in text


def _copies(stage_instrs) -> list[tuple[list[str], str]]:
    out = []
    for ins, args in stage_instrs:
        if ins == "COPY" and not args.startswith("--from"):
            parts = shlex.split(args)
            out.append((parts[:-1], parts[-1]))
    return out


@pytest.fixture(scope="module")
def image_venv(instrs, tmp_path_factory):
    """The build stage replayed: its COPY sources into a context, the wheel, a --copies venv."""
    tmp = tmp_path_factory.mktemp("image")
    (_, build), _ = stages(instrs)
    ctx = tmp / "src"
    ctx.mkdir()
    for srcs, dest in _copies(build):
        for s in srcs:
            src = ROOT / s
            assert src.exists(), f"COPY source {s} missing"
            # several sources or a dest ending in "/": into that directory; else: renamed to dest
            target = ctx / dest / src.name if len(srcs) > 1 or dest.endswith("/") else ctx / dest
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    wheels = tmp / "wheels"
    # build isolation would fetch setuptools from an index; the project venv already has it
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--wheel-dir", str(wheels), str(ctx)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    whl = sorted(wheels.glob("halb-*.whl"))
    assert len(whl) == 1, list(wheels.iterdir())
    venv = tmp / "opt-halb"
    r = subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", str(venv)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                        str(whl[0])], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    # The image's pip resolves the dependencies from the index; here they come from the
    # project venv (a plain path entry: its editable-install hook for halb is not run).
    site = Path(sysconfig.get_paths()["purelib"])
    vsite = next((venv / "lib").glob("python3*/site-packages"))
    (vsite / "zz_deps_from_project_venv.pth").write_text(str(site) + "\n")
    return {"venv": venv, "wheel": whl[0], "ctx": ctx}


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


def test_wheel_holds_the_package_and_both_commands(image_venv):
    with zipfile.ZipFile(image_venv["wheel"]) as z:
        names = z.namelist()
        eps = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ep_text = z.read(eps).decode()
    assert "halb/cli/halbd.py" in names and "halb/config.py" in names
    assert not any(n.startswith(("tests/", "lab/")) for n in names)
    assert "halbd = halb.cli.halbd:main" in ep_text
    assert "halbctl = halb.cli.halbctl:main" in ep_text


def test_installed_halb_comes_from_the_wheel(image_venv):
    venv = image_venv["venv"]
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import halb; print(halb.__file__)"],
                       capture_output=True, text=True, timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(venv), r.stdout


def test_interpreter_is_a_real_file_for_setcap(image_venv):
    py = image_venv["venv"] / "bin" / "python3.11"
    assert py.exists() and not py.is_symlink(), "setcap needs a real file, not a symlink"


def test_entrypoint_and_healthcheck_commands_run(instrs, image_venv):
    venv = image_venv["venv"]
    _, (_, run) = stages(instrs)
    entry = exec_form([a for i, a in run if i == "ENTRYPOINT"][-1])
    health = [a for i, a in run if i == "HEALTHCHECK"][-1]
    assert " CMD " in f" {health} "
    hc = exec_form(health.split(" CMD ", 1)[1])
    for argv in (entry, hc):
        exe = venv / "bin" / argv[0]
        assert exe.exists(), f"{argv[0]} is not installed in the image's venv"
    r = subprocess.run([str(venv / "bin" / entry[0]), "--version"], capture_output=True,
                       text=True, timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0 and "halbd" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(venv / "bin" / hc[0]), "--help"], capture_output=True, text=True,
                       timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0 and "status" in r.stdout, r.stdout + r.stderr
    # the healthcheck fails (non-zero) when no node answers on its socket
    r = subprocess.run([str(venv / "bin" / hc[0])] + hc[1:], capture_output=True, text=True,
                       timeout=60, env=_env(venv), cwd="/")
    assert r.returncode != 0


def test_halbd_check_passes_on_every_copied_config(instrs, image_venv):
    venv = image_venv["venv"]
    _, (_, run) = stages(instrs)
    configs = [ROOT / s for srcs, _ in _copies(run) for s in srcs if s.endswith(".toml")]
    assert len(configs) >= 2
    cmd = exec_form([a for i, a in run if i == "CMD"][-1])
    dests = [d for srcs, d in _copies(run) for s in srcs if s.endswith(".toml")]
    assert cmd[0] in dests, "the default CMD config is one the image copies"
    for cfg in configs:
        r = subprocess.run([str(venv / "bin" / "halbd"), "--check", str(cfg)], capture_output=True,
                           text=True, timeout=60, env=_env(venv), cwd="/")
        assert r.returncode == 0, f"{cfg}: {r.stdout}{r.stderr}"
        assert ": ok (node" in r.stdout
