"""cpu_priority: an idle cgroup under the fleet's own cgroup where the machine allows one, and a
quiet fallback where not. The real kernel's groups are exercised by the integration tests; here,
the reading of /proc's cgroup files, on the layouts machines have."""

from __future__ import annotations

from pathlib import Path

from services.slow import cpu_priority

V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
V2 = """\
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def own(tmp_path: Path, mountinfo: str, membership: str) -> tuple[Path, bool, bool] | None:
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(membership)
    return cpu_priority.own_cpu_cgroup(tmp_path / "mountinfo", tmp_path / "cgroup")


def test_v1_the_group_is_the_process_s_cpu_cgroup_under_the_cpu_mount(tmp_path):
    membership = "4:memory:/system.slice/fleet.service\n2:cpu,cpuacct:/system.slice/fleet.service\n0::/\n"
    assert own(tmp_path, V1, membership) == (Path("/sys/fs/cgroup/cpu,cpuacct/system.slice/fleet.service"), False,
                                             False)
    assert own(tmp_path, V1, "2:cpu,cpuacct:/\n")[2] is True  # started in the root group: says so


def test_a_container_s_mount_shows_its_hierarchy_from_a_subdirectory(tmp_path):
    mountinfo = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    assert own(tmp_path, mountinfo, "1:cpu:/docker/abc/fleet\n")[0] == Path("/sys/fs/cgroup/cpu/fleet")


def test_v2_the_group_counts_only_if_it_is_offered_the_cpu_controller(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    service = tree / "system.slice" / "fleet.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu memory pids\n")
    mountinfo = V2.replace("/sys/fs/cgroup", str(tree))
    assert own(tmp_path, mountinfo, "0::/system.slice/fleet.service\n") == (service, True, False)
    (service / "cgroup.controllers").write_text("memory pids\n")  # not delegated cpu
    assert own(tmp_path, mountinfo, "0::/system.slice/fleet.service\n") is None


def test_no_cpu_controller_mounted_means_no_group(tmp_path):
    assert own(tmp_path, "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "4:memory:/\n") is None


def test_v2_s_root_cgroup_is_never_touched(tmp_path, monkeypatch):
    touched = []
    monkeypatch.setattr(cpu_priority, "own_cpu_cgroup", lambda: (tmp_path, True, True))
    monkeypatch.setattr(cpu_priority, "_delegate_cpu", lambda base: touched.append(base))
    assert cpu_priority.create_idle_cgroup("slow-01-test") is None
    assert touched == [] and list(tmp_path.iterdir()) == []


def test_a_directory_without_cpu_idle_is_not_taken_for_an_idle_cgroup(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_priority, "own_cpu_cgroup", lambda: (tmp_path, False, False))
    # looks like a cgroup, but no kernel is behind it: mkdir makes no cpu.idle file
    assert cpu_priority.create_idle_cgroup("slow-01-test") is None


def test_recorded_groups_are_removed_with_their_parent_once_empty(tmp_path):
    groups = [tmp_path / cpu_priority.IDLE / name for name in ("slow-01-x", "dask-worker-01-x")]
    for group in groups:
        group.mkdir(parents=True)
    record = tmp_path / "cgroups"
    record.write_text("".join(f"{g}\n" for g in groups + groups[:1]))  # written once per creator
    assert cpu_priority.remove_recorded(record) == []
    assert not (tmp_path / cpu_priority.IDLE).exists() and not record.exists()
    assert cpu_priority.remove_recorded(record) == []  # nothing recorded: nothing to do


def test_a_group_that_still_holds_something_is_reported_and_kept_in_the_record(tmp_path):
    group = tmp_path / cpu_priority.IDLE / "slow-01-x"
    group.mkdir(parents=True)
    (group / "cgroup.procs").write_text("123\n")  # a real cgroup refuses rmdir while it holds a process
    record = tmp_path / "cgroups"
    record.write_text(f"{group}\n")
    assert cpu_priority.remove_recorded(record, patience=0.2) == [str(group)]
    assert record.exists()


def test_removing_a_group_that_is_gone_is_harmless(tmp_path):
    cpu_priority.remove(tmp_path / "never-made")


def test_a_process_already_in_an_idle_group_makes_a_sibling_group_not_a_child(tmp_path, monkeypatch):
    # A Dask worker joins its own idle group, then its job pool asks for one: nesting it made the
    # worker's group impossible to remove while the child existed (found by make stop).
    own = tmp_path / cpu_priority.IDLE / "dask-worker-01-x"
    own.mkdir(parents=True)
    (own / "cpu.idle").write_text("1\n")
    monkeypatch.setattr(cpu_priority, "own_cpu_cgroup", lambda: (own, False, False))
    assert cpu_priority.create_idle_cgroup("dask-worker-01-x") == own
    assert list(own.glob("*/")) == []


def test_a_nested_group_is_removed_before_its_parent_whatever_the_record_s_order(tmp_path):
    parent = tmp_path / cpu_priority.IDLE / "dask-worker-01-x"
    child = parent / cpu_priority.IDLE / "dask-worker-01-x"
    child.mkdir(parents=True)
    record = tmp_path / "cgroups"
    record.write_text(f"{parent}\n{child}\n")
    assert cpu_priority.remove_recorded(record, patience=0) == []
    assert not parent.exists()


def test_v2_a_process_in_the_leaf_makes_its_group_under_the_fleet_s_cgroup_not_under_the_leaf(tmp_path, monkeypatch):
    service = tmp_path / "fleet.service"
    leaf = service / cpu_priority.LEAF
    group = service / cpu_priority.IDLE / "slow-01-x"
    for directory in (leaf, group):
        directory.mkdir(parents=True)
    (group / "cpu.idle").write_text("1\n")  # made at the first instance's start
    monkeypatch.setattr(cpu_priority, "own_cpu_cgroup", lambda: (leaf, True, False))
    assert cpu_priority.create_idle_cgroup("slow-01-x") == group


def test_a_group_name_is_one_directory_whatever_its_owner_is_called(tmp_path):
    # An external cluster's worker started without --name is named "tcp://127.0.0.1:42365": its
    # slashes once made nested directories that no stop removed.
    name = cpu_priority.group_name("tcp://127.0.0.1:42365", tmp_path)
    assert "/" not in name and name.startswith("tcp___127.0.0.1_42365-")
    assert cpu_priority.group_name("slow-01", tmp_path).startswith("slow-01-")
