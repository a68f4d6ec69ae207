"""The Containerfile, tested without a container engine (none runs on these machines).

What it does is replayed here step by step: the build stage's sources exist, the wheel it
builds (`pip wheel --no-deps`) builds from exactly those sources, installs into a fresh venv
made the way the image makes it (`venv --copies`, pip run by the interpreter the build stage
names), the build stage's own checks pass, the run stage's `setcap` (and its check) is applied
to that venv, the entrypoint (`halbd`) and healthcheck (`halbctl`) commands exist there and run,
and `halbd --check` passes on every config it copies.

Compiled hot path: the build stage installs gcc and libc6-dev (checked to be installed here, the
apt-get steps themselves are not run), so the wheel holds the compiled modules of
halb._ext.COMPILED (with their .py and .pxd sources, and no generated .c or stray .so from the
build context), and the image's halbd runs them compiled; the run stage has no compiler.

Capabilities: with `venv --copies`, bin/python, bin/python3 and bin/python3.11 are three
separate files and only the one `setcap` names carries cap_net_admin,cap_net_bind_service,
cap_net_raw. So the
interpreter each script's shebang names (resolved) must be that very file, and a non-root user
running it must end up holding both capabilities (checked with setpriv, as the containerlab
topology runs halbd). Needs `setcap`/`getcap` (Debian libcap2-bin, installed by ./dev).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
IMAGE_VENV = "/opt/halb"
CAPS = "cap_net_bind_service,cap_net_admin,cap_net_raw=ep"  # getcap's spelling of what setcap sets
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13


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
    # the compiler is in the build stage, before the wheel is built, and not in the run stage
    build_runs = [a for i, a in build if i == "RUN"]
    wheel_at = next(n for n, a in enumerate(build_runs) if "pip wheel" in a)
    apt = [set(shlex.split(c)[2:]) for a in build_runs[:wheel_at] for c in _shell_commands(a)
           if c.startswith("apt-get install ")]
    assert apt and {"gcc", "libc6-dev"} <= set().union(*apt), "build stage: gcc and libc6-dev"
    run_apt = " ".join(a for i, a in run if i == "RUN" and "apt-get install" in a)
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential)\b", run_apt), run_apt
    text = CONTAINERFILE.read_text()
    assert "NET_ADMIN" in text and "NET_RAW" in text, "capabilities are documented"
    assert "setcap cap_net_admin,cap_net_bind_service,cap_net_raw+ep /opt/halb/bin/python3.11" in text
    # iproute2 needs libcap2-bin in bookworm: purging it removed `ip` from the image
    assert "purge" not in text and "autoremove" not in text
    assert "--format docker" in text  # OCI images drop HEALTHCHECK


def _copies(stage_instrs) -> list[tuple[list[str], str]]:
    out = []
    for ins, args in stage_instrs:
        if ins == "COPY" and not args.startswith("--from"):
            parts = shlex.split(args)
            out.append((parts[:-1], parts[-1]))
    return out


def _shell_commands(run_args: str) -> list[str]:
    """A RUN line's top-level `&&` steps (the Containerfile keeps `&&` out of its loops)."""
    return [c.strip() for c in run_args.split(" && ")]


def _sh(cmd: str, subst: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    for a, b in subst.items():
        cmd = cmd.replace(a, b)
    return subprocess.run(["sh", "-ec", cmd], capture_output=True, text=True, timeout=timeout)


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                       text=True, timeout=30)
    return r.returncode == 0 and "install ok installed" in r.stdout


def _need_libcap() -> None:
    if not (shutil.which("setcap") and shutil.which("getcap")):
        pytest.fail("setcap/getcap missing: apt-get install libcap2-bin (./dev setup does)")


def _getcap(path: Path) -> str:
    r = subprocess.run(["getcap", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()[len(str(path)):].strip()


def _shebang_interpreter(script: Path) -> Path:
    """The file the kernel runs for `script`: its shebang's program, symlinks resolved."""
    first = script.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("#!"), f"{script}: no shebang: {first!r}"
    prog = shlex.split(first[2:])[0]
    assert prog not in ("/bin/sh", "/usr/bin/env"), \
        f"{script}: {first!r} does not name the venv's interpreter directly"
    return Path(os.path.realpath(prog))


@pytest.fixture(scope="module")
def image_venv(instrs):
    """The build stage replayed (its COPY sources into a context, then its RUN steps: the wheel,
    the --copies venv, pip as the interpreter it names, its checks), then the run stage's
    `setcap` and check. /opt/halb becomes a temporary directory that other users may enter
    (the capability check runs a script as `nobody`)."""
    _need_libcap()
    base = Path(tempfile.mkdtemp(prefix="halb-image-"))
    base.chmod(0o755)
    try:
        yield _replay(instrs, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _replay(instrs, tmp: Path) -> dict:
    (_, build), (_, run) = stages(instrs)
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
    # build products a developer's tree may hold (an editable install builds in place; Cython
    # run by hand writes .c files): none may reach the wheel
    (ctx / "halb" / "proxy" / "http.c").write_text("/* stale generated C */\n")
    (ctx / "halb" / "proxy" / "stale.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\0")
    wheels = tmp / "wheels"
    venv = tmp / "opt-halb"
    subst = {IMAGE_VENV: str(venv), "/wheels": str(wheels)}
    steps = [c for i, a in build if i == "RUN" for c in _shell_commands(a)]
    assert any(c.startswith("pip wheel ") for c in steps)
    installed = False
    for step in steps:
        if step.startswith("apt-get install "):
            # the image's packages: present here too (./dev setup installs them), not installed
            pkgs = [a for a in shlex.split(step)[2:] if not a.startswith("-")]
            missing = [p for p in pkgs if not _dpkg_installed(p)]
            assert not missing, f"the build stage installs {missing}: missing here (./dev setup)"
        elif step.startswith(("apt-get update", "rm -rf /var/lib/apt/lists/")):
            continue  # the image's package lists, not this machine's
        elif step.startswith("pip wheel "):
            # build isolation would fetch setuptools from an index; the project venv has it
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                                "--no-build-isolation", "--disable-pip-version-check",
                                "--wheel-dir", str(wheels), str(ctx)],
                               capture_output=True, text=True, timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
        elif m := re.fullmatch(r"python3?(?:\.11)? -m venv (.*) " + IMAGE_VENV, step):
            flags = shlex.split(m.group(1))
            assert "--copies" in flags, step
            # without pip: pip is run below from the project venv, as the named interpreter
            r = subprocess.run([sys.executable, "-m", "venv", *flags, "--without-pip", str(venv)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        elif m := (re.fullmatch(r"(\S+) -m pip install (\S+)", step)
                   or re.fullmatch(r"(\S+)/pip3?(?:\.11)? install (\S+)", step)):
            interp = m.group(1)
            if not step.split()[1] == "-m":  # bin/pip: its shebang, written by the venv: python
                interp += "/python"
            for a, b in subst.items():
                interp = interp.replace(a, b)
            whl = sorted(wheels.glob(Path(m.group(2)).name))
            assert len(whl) == 1, list(wheels.iterdir())
            # `pip --python X` runs pip under X, as `X -m pip` does: same sys.executable, so the
            # same shebang in the scripts. The image resolves the dependencies from the index;
            # here they come from the project venv (a .pth below).
            r = subprocess.run([sys.executable, "-m", "pip", "--python", interp, "install",
                                "--no-deps", "--no-index", "--disable-pip-version-check",
                                str(whl[0])], capture_output=True, text=True, timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
            installed = True
        else:
            r = _sh(step, subst)
            assert r.returncode == 0, f"build step failed: {step}\n{r.stdout}{r.stderr}"
    assert installed, "the build stage installs the wheel into the venv"
    whl = sorted(wheels.glob("halb-*.whl"))
    assert len(whl) == 1, list(wheels.iterdir())
    # the project venv's packages (a plain path entry: its editable-install hook for halb is
    # not run)
    site = Path(sysconfig.get_paths()["purelib"])
    vsite = next((venv / "lib").glob("python3*/site-packages"))
    (vsite / "zz_deps_from_project_venv.pth").write_text(str(site) + "\n")
    # the run stage: setcap and its check; the other steps (apt-get, users) change the system
    cap_run = [a for i, a in run if i == "RUN" and "setcap " in a]
    assert len(cap_run) == 1
    setcap_target = None
    checks = []
    for step in _shell_commands(cap_run[0]):
        if step.startswith("setcap "):
            setcap_target = Path(shlex.split(step)[-1].replace(IMAGE_VENV, str(venv)))
        if step.startswith(("setcap ", "for ")):
            checks.append(step)
            r = _sh(step, subst)
            assert r.returncode == 0, f"run step failed: {step}\n{r.stdout}{r.stderr}"
    assert setcap_target is not None
    return {"venv": venv, "wheel": whl[0], "ctx": ctx, "capable": setcap_target,
            "run_checks": [c for c in checks if c.startswith("for ")], "tmp": tmp}


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HALB_NO_EXTENSIONS")}
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


def test_wheel_holds_the_compiled_hot_path_and_its_sources(image_venv):
    from halb._ext import COMPILED
    with zipfile.ZipFile(image_venv["wheel"]) as z:
        names = z.namelist()
    assert not image_venv["wheel"].name.endswith("-none-any.whl"), "a pure-Python wheel"
    for mod in COMPILED:
        base = mod.replace(".", "/")
        assert f"{base}.py" in names, f"{base}.py: the source (the fallback) is in the wheel"
        assert [n for n in names if n.startswith(base + ".cpython-3") and n.endswith(".so")], \
            f"{mod}: no compiled extension in the wheel (did setup.py fall back to pure Python?)"
        if (ROOT / f"{base}.pxd").exists():
            assert f"{base}.pxd" in names
    assert not [n for n in names if n.endswith(".c")], "generated C in the wheel"
    assert not [n for n in names if "stale" in n], "a .so from the build context in the wheel"


def test_installed_halb_comes_from_the_wheel(image_venv):
    venv = image_venv["venv"]
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import halb; print(halb.__file__)"],
                       capture_output=True, text=True, timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(venv), r.stdout


def test_interpreter_is_a_real_file_for_setcap(image_venv):
    py = image_venv["venv"] / "bin" / "python3.11"
    assert py.exists() and not py.is_symlink(), "setcap needs a real file, not a symlink"


def _entry_and_health(instrs) -> tuple[list[str], list[str]]:
    _, (_, run) = stages(instrs)
    entry = exec_form([a for i, a in run if i == "ENTRYPOINT"][-1])
    health = [a for i, a in run if i == "HEALTHCHECK"][-1]
    assert " CMD " in f" {health} "
    return entry, exec_form(health.split(" CMD ", 1)[1])


def _in_image(instrs, venv: Path, prog: str) -> Path:
    """The file `prog` runs in the image, mapped into the replayed venv: an absolute path
    under /opt/halb, or a bare name found through the image's PATH (only /opt/halb counts)."""
    if prog.startswith("/"):
        assert prog.startswith(IMAGE_VENV + "/"), f"{prog} is not in the image's venv"
        return venv / prog[len(IMAGE_VENV) + 1:]
    _, (_, run) = stages(instrs)
    paths = [m.group(1) for i, a in run if i == "ENV"
             for m in [re.search(r"(?:^|\s)PATH=(\S+)", a)] if m]
    assert paths, f"{prog}: a bare name, and the image sets no PATH"
    for d in paths[-1].split(":"):
        if d.startswith(IMAGE_VENV) and (venv / d[len(IMAGE_VENV) + 1:] / prog).exists():
            return venv / d[len(IMAGE_VENV) + 1:] / prog
    raise AssertionError(f"{prog} is not installed in the image's venv")


def test_entrypoint_and_healthcheck_commands_run(instrs, image_venv):
    venv = image_venv["venv"]
    entry, hc = _entry_and_health(instrs)
    halbd, halbctl = _in_image(instrs, venv, entry[0]), _in_image(instrs, venv, hc[0])
    assert halbd.name == "halbd" and halbctl.name == "halbctl"
    r = subprocess.run([str(halbd), "--version"], capture_output=True,
                       text=True, timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0 and "halbd" in r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().endswith("(L7 hot path: compiled)"), r.stdout + r.stderr
    assert not r.stderr, r.stderr
    r = subprocess.run([str(halbctl), "--help"], capture_output=True, text=True,
                       timeout=60, env=_env(venv), cwd="/")
    assert r.returncode == 0 and "status" in r.stdout, r.stdout + r.stderr
    # the healthcheck fails (non-zero) when no node answers on its socket
    r = subprocess.run([str(halbctl)] + hc[1:], capture_output=True, text=True,
                       timeout=60, env=_env(venv), cwd="/")
    assert r.returncode != 0


def test_setcap_gives_the_interpreter_both_capabilities(image_venv):
    assert _getcap(image_venv["capable"]) == CAPS
    # and only that file: the other names of the interpreter are plain copies without them
    for other in ("python", "python3"):
        exe = image_venv["venv"] / "bin" / other
        if exe.exists() and not exe.samefile(image_venv["capable"]):
            assert _getcap(exe) == ""


def test_entrypoint_and_healthcheck_run_the_interpreter_with_the_capabilities(instrs, image_venv):
    """The review's bug: the scripts' shebang named bin/python, a copy without capabilities,
    so halbd ran as `halb` with neither NET_RAW nor NET_ADMIN."""
    venv, capable = image_venv["venv"], image_venv["capable"]
    entry, hc = _entry_and_health(instrs)
    for prog in (entry[0], hc[0]):
        script = _in_image(instrs, venv, prog)
        interp = _shebang_interpreter(script)
        assert interp.samefile(capable), \
            f"{prog} runs {interp}, not {capable} (the file setcap gave the capabilities)"
        assert _getcap(interp) == CAPS, f"{prog}: {interp} has no {CAPS}"


def _old_layout(image_venv, name: str) -> Path:
    """A copy of /opt/halb/bin as the broken image had it: halbd and halbctl with the shebang
    pip wrote when run as bin/pip (bin/python, a copy without capabilities)."""
    venv = image_venv["venv"]
    fake = image_venv["tmp"] / name
    (fake / "bin").mkdir(parents=True)
    for f in ("halbd", "halbctl"):
        body = (venv / "bin" / f).read_text().split("\n", 1)[1]
        (fake / "bin" / f).write_text(f"#!{venv / 'bin' / 'python'}\n{body}")
        (fake / "bin" / f).chmod(0o755)
    return fake


def test_the_images_capability_check_rejects_an_interpreter_without_them(image_venv):
    """The run stage's own check (replayed above on the real layout) fails the build on the
    broken one."""
    assert image_venv["run_checks"], "the run stage checks the scripts' interpreters"
    fake = _old_layout(image_venv, "old-layout")
    assert _getcap(_shebang_interpreter(fake / "bin" / "halbd")) == ""
    for check in image_venv["run_checks"]:
        r = _sh(check, {IMAGE_VENV: str(fake)})
        assert r.returncode != 0 and "halbd" in r.stderr, r.stdout + r.stderr


def _status_caps(out: str) -> int:
    m = re.search(r"^CapEff:\s*([0-9a-f]+)$", out, re.M)
    assert m, out
    return int(m.group(1), 16)


def test_a_non_root_user_running_halbd_holds_net_admin_and_net_raw(image_venv):
    """What the image and lab/halb.clab.yml do (USER halb; setpriv --reuid=halb ... halbd),
    with `nobody`: a script with halbd's shebang reports the capabilities it runs with."""
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    # CI and the developers' machines run as root with full capabilities: these hold there
    assert os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv (util-linux)"
    assert not re.search(r"^NoNewPrivs:\s*1$", status, re.M), \
        "no_new_privs is set: file capabilities would not be honoured"
    assert bounding >> CAP_NET_ADMIN & 1 and bounding >> CAP_NET_RAW & 1, \
        "NET_ADMIN/NET_RAW not in this process's bounding set"
    venv = image_venv["venv"]
    probe_body = "import sys; sys.stdout.write(open('/proc/self/status').read())\n"

    def caps_as_nobody(shebang_of: Path) -> int:
        probe = shebang_of.parent / "capprobe"
        first = shebang_of.read_text().split("\n", 1)[0]
        probe.write_text(f"{first}\n{probe_body}")
        probe.chmod(0o755)
        try:
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                str(probe)], capture_output=True, text=True, timeout=60, cwd="/",
                               env={"PATH": "/usr/bin:/bin"})
        finally:
            probe.unlink()
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"^Uid:\s*65534\b", r.stdout, re.M), r.stdout
        return _status_caps(r.stdout)

    eff = caps_as_nobody(venv / "bin" / "halbd")
    assert eff >> CAP_NET_ADMIN & 1 and eff >> CAP_NET_RAW & 1, f"CapEff {eff:#x}"
    assert eff >> CAP_NET_BIND_SERVICE & 1, f"CapEff {eff:#x}: ports below 1024 under podman"
    # the broken layout: the same user gets neither
    old = _old_layout(image_venv, "old-layout-run")
    (old.parent).chmod(0o755)
    old.chmod(0o755)
    (old / "bin").chmod(0o755)
    eff = caps_as_nobody(old / "bin" / "halbd")
    assert not (eff >> CAP_NET_ADMIN & 1 or eff >> CAP_NET_RAW & 1), f"CapEff {eff:#x}"


def test_halbd_check_passes_on_every_copied_config(instrs, image_venv, tmp_path_factory):
    venv = image_venv["venv"]
    _, (_, run) = stages(instrs)
    configs = [ROOT / s for srcs, _ in _copies(run) for s in srcs if s.endswith(".toml")]
    assert len(configs) >= 2
    cmd = exec_form([a for i, a in run if i == "CMD"][-1])
    dests = [d for srcs, d in _copies(run) for s in srcs if s.endswith(".toml")]
    assert cmd[0] in dests, "the default CMD config is one the image copies"
    for i, cfg in enumerate(configs):
        # the certificates are bound into the container at /etc/halb/pki (halb.clab.yml); the
        # check needs them to exist, so it reads the config with the host's copy there
        text = cfg.read_text().replace('"/etc/halb/pki/', f'"{ROOT}/lab/configs/clab/pki/')
        cfg = tmp_path_factory.mktemp("cfg") / cfg.name if "/etc/halb/pki/" in cfg.read_text() else cfg
        if not cfg.exists():
            cfg.write_text(text)
        r = subprocess.run([str(venv / "bin" / "halbd"), "--check", str(cfg)], capture_output=True,
                           text=True, timeout=60, env=_env(venv), cwd="/")
        assert r.returncode == 0, f"{cfg}: {r.stdout}{r.stderr}"
        assert ": ok (node" in r.stdout
