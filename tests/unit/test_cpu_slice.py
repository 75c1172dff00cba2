"""cpu_slice: the fast path's short time slice, asked of the kernel through sched_setattr(2)."""

from __future__ import annotations

import os

import pytest

from services.common import cpu_slice

NEW_ENOUGH = cpu_slice.kernel_has_custom_slices()


def in_child(body) -> int:
    """Run `body` in a forked child (a slice or niceness set there never reaches the test run);
    its exit status: 0 when every assertion held."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not NEW_ENOUGH, reason="custom time slices need Linux 6.12+")
def test_a_requested_slice_is_granted_keeps_the_niceness_and_is_inherited():
    def body():
        os.nice(7)
        assert cpu_slice.request(300)
        assert cpu_slice.slice_ns(os.getpid()) == 300_000
        assert os.getpriority(os.PRIO_PROCESS, 0) == 7  # sched_setattr sets niceness too
        assert in_child(lambda: None if cpu_slice.slice_ns(os.getpid()) == 300_000 else os._exit(1)) == 0

    assert in_child(body) == 0


@pytest.mark.skipif(not NEW_ENOUGH, reason="custom time slices need Linux 6.12+")
def test_below_the_kernel_s_floor_the_slice_is_100_us():
    def body():
        assert cpu_slice.request(20)
        assert cpu_slice.slice_ns(os.getpid()) == 100_000

    assert in_child(body) == 0


def test_zero_leaves_the_kernel_s_default():
    before = cpu_slice.slice_ns(os.getpid())

    def body():
        assert cpu_slice.request(0) is False
        assert cpu_slice.slice_ns(os.getpid()) == before

    assert in_child(body) == 0


def test_custom_slices_are_known_from_linux_6_12_on():
    assert cpu_slice.kernel_has_custom_slices("6.18.44-fc-v1045")
    assert cpu_slice.kernel_has_custom_slices("6.12.0")
    assert not cpu_slice.kernel_has_custom_slices("6.11.9-amd64")
    assert not cpu_slice.kernel_has_custom_slices("5.15.0-91-generic")
