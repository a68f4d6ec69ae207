"""How much CPU this process may use: the cgroup CPU quota, read from the cgroup file system.

A container or a systemd unit may hold halbd to part of a core or to a few cores (``cpu.max``
in cgroup v2, ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` in cgroup v1).
:func:`cpu_quota` returns it in cores, or None when there is none: the TCP relay's splice gate
compares the process's CPU time against it, so a node limited to 40% of a core counts as busy
at 40%.

Every cgroup on the way from the process's own up to the root can hold a quota; the
tightest counts. Files that are missing or unreadable mean no limit. A process outside its
cgroup namespace's root (a path starting ``/..``) cannot see its own cgroup: no limit either.
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


def _ratio(quota: str | None, period: str | None) -> float | None:
    """quota / period in cores from the two numbers' text; None for no quota or bad text."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # v1 says -1 for none


def _v2(d: str) -> float | None:
    parts = (_read(os.path.join(d, "cpu.max")) or "").split()  # "max 100000" or "40000 100000"
    return _ratio(*parts) if len(parts) == 2 else None


def _v1(d: str) -> float | None:
    return _ratio(_read(os.path.join(d, "cpu.cfs_quota_us")),
                  _read(os.path.join(d, "cpu.cfs_period_us")))


def _tightest(mount: str, path: str, quota_of) -> float | None:
    """The smallest quota on the way from ``path``'s cgroup up to the root."""
    quotas = [q for q in (quota_of(os.path.join(mount, p.lstrip("/"))) for p in _ancestors(path))
              if q is not None]
    return min(quotas) if quotas else None


def cpu_quota(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The CPU this process may use, in cores (0.4, 2.0, ...); None without a quota."""
    try:
        with open(proc_cgroup, encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if path.startswith("/.."):  # outside our namespace's view: the files are not ours
            continue
        if controllers == "":  # cgroup v2 (unified); mounted at the root or at root/unified
            for mount in (root, os.path.join(root, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    q = _tightest(mount, path, _v2)
                    if q is not None:
                        quotas.append(q)
                    break
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                mount = os.path.join(root, name)
                if os.path.isdir(mount):
                    q = _tightest(mount, path, _v1)
                    if q is not None:
                        quotas.append(q)
                    break
    return min(quotas) if quotas else None
