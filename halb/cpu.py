"""How much CPU this process may use: the cgroup CPU quota, read from the cgroup file system.

halbd's event loop runs on one thread, so it can use at most one core; a container or a
systemd unit may allow less (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` and
``cpu.cfs_period_us`` in cgroup v1). :func:`cpu_capacity` returns the smaller of the two, as a
fraction of one core: the TCP relay's splice gate compares the CPU it sees used against it,
so a node limited to 40% of a core counts as busy at 40%.

Every cgroup on the way from the process's own up to the root can hold a quota; the
tightest counts. Files that are missing or unreadable mean no limit (1.0).
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(256).strip()
    except OSError:
        return None


def _ancestors(path: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a', '/']"""
    path = "/" + path.strip("/")
    out = [path]
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def _quota_v2(root: str, path: str) -> float | None:
    best = None
    for p in _ancestors(path):
        text = _read(os.path.join(root, p.lstrip("/"), "cpu.max"))
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or parts[0] == "max":
            continue
        try:
            q = int(parts[0]) / int(parts[1])
        except (ValueError, ZeroDivisionError):
            continue
        if q > 0 and (best is None or q < best):
            best = q
    return best


def _quota_v1(mount: str, path: str) -> float | None:
    best = None
    for p in _ancestors(path):
        d = os.path.join(mount, p.lstrip("/"))
        quota, period = _read(os.path.join(d, "cpu.cfs_quota_us")), \
            _read(os.path.join(d, "cpu.cfs_period_us"))
        if not quota or not period:
            continue
        try:
            qi, pi = int(quota), int(period)
        except ValueError:
            continue
        if qi <= 0 or pi <= 0:  # -1: no quota
            continue
        q = qi / pi
        if best is None or q < best:
            best = q
    return best


def cpu_capacity(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float:
    """The CPU this process may use, as a fraction of one core, in (0, 1]."""
    try:
        with open(proc_cgroup, encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return 1.0
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 (unified); mounted at the root or at root/unified
            for mount in (root, os.path.join(root, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    q = _quota_v2(mount, path)
                    if q is not None:
                        quotas.append(q)
                    break
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                mount = os.path.join(root, name)
                if os.path.isdir(mount):
                    q = _quota_v1(mount, path)
                    if q is not None:
                        quotas.append(q)
                    break
    return min([1.0, *quotas])
