"""Ask the kernel for a short CPU time slice: how the fast path cuts in ahead of heavy work.

Linux's fair scheduler (EEVDF, 6.6 and later) lets the task it picked run out its time slice
(RUN_TO_PARITY; by default 0.7 ms x (1 + log2 CPUs): 1.4 ms here) before a task woken meanwhile
gets the CPU, whatever their niceness: nice changes how often a task is picked, not how long it
keeps the CPU once picked. So an event loop woken by a request waited out the slice of whatever
ran: the slow instance's Dask client, a Dask worker, a job process picked at its turn.

Since 6.12 a task may ask for a shorter slice (sched_setattr's sched_runtime, 0.1-100 ms), and a
woken task whose slice is shorter than the running one's may preempt it at once (PREEMPT_SHORT:
when the woken task is owed CPU time and its deadline comes first). The
fast instances, the upstream service's replicas they call, and nginx (through its launcher: a slice
is inherited by every process and thread forked after) ask for `fast.sched_slice_us`; the heavy
path keeps the kernel's default.

Measured (python -m bench.levers sched, bench/results/sched.md, README "Benchmark"): perf sched
under the heavy flood showed the fast path waiting 4.7-9.3 ms a second behind the Dask backend's
slow instance alone, at a niceness of 5, 15 or 19 alike; 4.2 and 4.4 with this slice.

Python has no binding for sched_setattr(2), hence ctypes. Kernels without custom slices (before
6.12) accept the call and ignore the field: `slice_ns` then reads back the default.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import struct

from services.common import procfs

log = logging.getLogger("fleet.cpu")

# sched_setattr(2) is not in glibc: by number, per architecture.
SYSCALL = {"x86_64": 314, "aarch64": 274, "riscv64": 274}
# struct sched_attr (SCHED_ATTR_SIZE_VER1): size, policy, flags, nice, priority, runtime (the
# slice for SCHED_OTHER), deadline, period, util_min, util_max.
ATTR = struct.Struct("=IIQiIQQQII")
SCHED_OTHER = 0


def request(slice_us: int) -> bool:
    """Ask for a `slice_us` microsecond slice for the calling thread (and what it starts after),
    keeping its niceness and its SCHED_OTHER policy. 0 leaves the kernel's default. True if the
    kernel now reports it."""
    if slice_us <= 0:
        return False
    number = SYSCALL.get(platform.machine())
    if number is None:
        log.info("no sched_setattr number for %s: the kernel's default time slice", platform.machine())
        return False
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # sched_setattr sets niceness too: keep it
    attr = ctypes.create_string_buffer(ATTR.pack(ATTR.size, SCHED_OTHER, 0, nice, 0, slice_us * 1000, 0, 0, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, 0, attr, 0) != 0:  # 0: the calling thread
        errno = ctypes.get_errno()
        log.info("sched_setattr refused a %d us slice (%s): the kernel's default", slice_us, os.strerror(errno))
        return False
    granted = slice_ns("thread-self")
    if granted is None or granted != max(slice_us, 100) * 1000:
        log.info("this kernel has no custom time slices (Linux 6.12+): the default, %s ns", granted)
        return False
    return True


def kernel_has_custom_slices(release: str = platform.release()) -> bool:
    """Linux 6.12 or later: sched_setattr sets a SCHED_OTHER task's slice."""
    return tuple(int(x) for x in re.findall(r"\d+", release)[:2]) >= (6, 12)


def slice_ns(pid: int | str) -> int | None:
    """The time slice the kernel gives `pid` (or "thread-self"), from /proc/<pid>/sched; None where
    it shows none."""
    value = (procfs.sched(pid) or {}).get("se.slice")
    return int(value) if value is not None else None
