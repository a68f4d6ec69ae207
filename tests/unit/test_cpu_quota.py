"""halb.cpu.cpu_quota on made-up cgroup trees (v1 and v2); the real file system is used by
tests/integration/test_tcp_relay_methods.py."""

from pathlib import Path

import pytest

from halb.cpu import cpu_quota

pytestmark = pytest.mark.unit


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def proc(tmp_path: Path, text: str) -> str:
    p = tmp_path / "proc-cgroup"
    p.write_text(text)
    return str(p)


def test_v2_quota_of_own_cgroup(tmp_path):
    root = tmp_path / "cg"
    write(root, "cgroup.controllers", "cpu memory")
    write(root, "system.slice/halbd.service/cpu.max", "40000 100000\n")
    assert cpu_quota(str(root), proc(tmp_path, "0::/system.slice/halbd.service\n")) == 0.4


def test_v2_tightest_ancestor_counts_and_max_means_none(tmp_path):
    root = tmp_path / "cg"
    write(root, "cgroup.controllers", "cpu")
    write(root, "a/cpu.max", "25000 100000")
    write(root, "a/b/cpu.max", "max 100000")
    write(root, "a/b/c/cpu.max", "50000 100000")
    assert cpu_quota(str(root), proc(tmp_path, "0::/a/b/c\n")) == 0.25


def test_v2_several_cores(tmp_path):
    root = tmp_path / "cg"
    write(root, "cgroup.controllers", "cpu")
    write(root, "k/cpu.max", "400000 100000")
    assert cpu_quota(str(root), proc(tmp_path, "0::/k\n")) == 4.0


def test_path_outside_the_namespace_root_means_no_limit(tmp_path):
    root = tmp_path / "cg"
    write(root, "cgroup.controllers", "cpu")
    write(root, "cpu.max", "20000 100000")  # the namespace root's: not ours
    assert cpu_quota(str(root), proc(tmp_path, "0::/../../other.slice/x\n")) is None


def test_v2_under_unified_mount_of_a_hybrid_host(tmp_path):
    root = tmp_path / "cg"
    write(root, "unified/cgroup.controllers", "")
    write(root, "unified/x/cpu.max", "30000 100000")
    assert cpu_quota(str(root), proc(tmp_path, "1:cpu:/\n0::/x\n")) == 0.3


def test_v1_quota_with_combined_controller_mount(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "50000\n")
    write(root, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    write(root, "cpu,cpuacct/docker/cpu.cfs_quota_us", "-1\n")
    write(root, "cpu,cpuacct/docker/cpu.cfs_period_us", "100000\n")
    text = "9:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cpu_quota(str(root), proc(tmp_path, text)) == 0.5


def test_v1_no_quota(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu/cpu.cfs_quota_us", "-1")
    write(root, "cpu/cpu.cfs_period_us", "100000")
    assert cpu_quota(str(root), proc(tmp_path, "1:cpu:/\n")) is None


@pytest.mark.parametrize("content", ["garbage", "abc 100000", "50000 0", "1 2 3", ""])
def test_unreadable_values_mean_no_limit(tmp_path, content):
    root = tmp_path / "cg"
    write(root, "cgroup.controllers", "cpu")
    write(root, "z/cpu.max", content)
    assert cpu_quota(str(root), proc(tmp_path, "0::/z\n")) is None


def test_missing_files_mean_no_limit(tmp_path):
    assert cpu_quota(str(tmp_path / "none"), str(tmp_path / "no-proc")) is None
    assert cpu_quota(str(tmp_path / "none"), proc(tmp_path, "junk line\n0::/a\n")) is None
