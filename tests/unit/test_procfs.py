"""services/common/procfs.py on this machine's /proc: the fields it reads, and a process that is gone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

from services.common import procfs
from tests.support.waiting import wait_for


def test_stat_is_read_past_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a) b (c"  # the kernel shows it in parentheses: "(a) b (c)"
    shutil.copy(shutil.which("sleep"), odd)
    child = subprocess.Popen([str(odd), "5"])
    try:
        stat = procfs.stat(child.pid)
        assert stat.ppid == os.getpid() and stat.state != "Z"  # just exec'd, it may still wait on the disk (D)
        assert stat.starttime >= procfs.stat(os.getpid()).starttime
        # Popen returns once execve has begun: the new arguments appear a moment later (until
        # then the kernel shows an empty command line).
        wait_for(lambda: procfs.argv(child.pid) == [str(odd), "5"], 5, interval=0.01, what="the exec'd arguments")
        assert procfs.cmdline(child.pid) == f"{odd} 5 "
        assert child.pid in procfs.children(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_a_zombie_is_not_alive_and_a_reaped_process_reads_as_gone():
    child = subprocess.Popen(["true"])
    wait_for(lambda: procfs.state(child.pid) == "Z", 5, interval=0.01, what="exited, not yet reaped")
    assert not procfs.alive(child.pid)
    child.wait()
    assert procfs.stat(child.pid) is None and procfs.argv(child.pid) is None and procfs.cmdline(child.pid) == ""
    assert procfs.status(child.pid) is None and procfs.fd_targets(child.pid) is None and procfs.environ(child.pid) == []


def test_descendants_reach_grandchildren():
    shell = subprocess.Popen(["sh", "-c", "sleep 5 & wait"])
    try:
        wait_for(lambda: procfs.children(shell.pid), 5, interval=0.01, what="the shell started its sleep")
        assert {shell.pid, *procfs.children(shell.pid)} <= set(procfs.descendants(os.getpid()))
    finally:
        for pid in procfs.descendants(shell.pid):
            os.kill(pid, 9)
        shell.wait()


def test_a_listening_socket_is_found_by_its_inode_among_our_descriptors():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ours = [procfs.tcp_sockets()[inode] for inode in procfs.socket_inodes(os.getpid())
                if inode in procfs.tcp_sockets()]
        assert procfs.TcpSocket(procfs.LISTEN, "0100007F", port) in ours


def test_cgroups_read_both_versions_lines(tmp_path):
    copy = tmp_path / "cgroup"
    copy.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n0::/system.slice/fleet.service\n")
    assert procfs.cgroups(file=copy) == {"cpu,cpuacct": "/docker/abc", "memory": "/docker/abc",
                                         "": "/system.slice/fleet.service"}
    assert procfs.cgroups(file=tmp_path / "none") == {}
