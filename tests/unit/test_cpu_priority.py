"""cpu_priority: an idle cgroup where the machine allows one, and a quiet fallback where not."""

from __future__ import annotations

from services.slow import cpu_priority


def test_no_cgroup_is_made_where_no_cpu_controller_is_mounted(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_priority, "CPU_CONTROLLER_MOUNTS", (tmp_path / "absent",))
    assert cpu_priority.create_idle_cgroup("slow-01-test") is None


def test_a_directory_without_cpu_idle_is_not_taken_for_an_idle_cgroup(tmp_path, monkeypatch):
    (tmp_path / "cgroup.procs").write_text("")  # looks like a cgroup mount, but the kernel is not behind it
    monkeypatch.setattr(cpu_priority, "CPU_CONTROLLER_MOUNTS", (tmp_path,))
    assert cpu_priority.create_idle_cgroup("slow-01-test") is None


def test_removing_a_group_that_is_gone_is_harmless(tmp_path):
    cpu_priority.remove(tmp_path / "never-made")
