"""A worker process's life, and the pipe between it and its pool (pool.py, the parent side).

A worker sets itself up once (its own process group, death with its parent, below the fast path on
the CPU, first in line for the OOM killer, each task's setup), then runs one job at a time from its
pipe and answers with a plain tuple, never an exception object:

    ("ready", pid, {task: (type, message, traceback) of a failed setup})    once, at start
    ("start_failed", type, message, traceback)                              the task modules did not load
    ("progress", done, total, message)                                      the job's progress (progress.py), any number
    ("ok", result JSON bytes, elapsed ms)                                   a job's result, encoded here
    ("error", type, message, traceback, [elapsed ms])                       the task raised
    ("too_large", size)                                                     the result is over the cap
    ("unavailable", type, message, traceback)                               the task's setup failed again

Messages use multiprocessing.Connection's framing (a 4-byte size, then the pickle): the worker
blocks on its end; the pool's end is non-blocking: the pool reads it a chunk at a time (Frames,
below) and writes it as it has room (pool.Sending), never blocking its event loop.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import select
import signal
import struct
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator

from services.slow import cpu_priority, progress

PR_SET_PDEATHSIG = 1
# Every worker, and every process a task starts, carries this in its environment: a restarted
# instance kills what a killed one left behind (a task's children outlive a SIGKILLed worker).
WORKER_MARKER = "FLEET_WORKER_OF"
# The most a process may raise itself without privilege: the OOM killer's first choice.
OOM_SCORE_ADJ = 1000


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent (the forkserver) exits.

    The forkserver exits as soon as the instance that owns it dies, even by SIGKILL, so no worker
    outlives its instance and keeps a CPU or a file busy.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def error_reply(exc: BaseException) -> tuple:
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not take the worker down
        message = "<unprintable message>"
    return ("error", type(exc).__name__, message[:2000], traceback.format_exc())


def encode_result(result: Any, max_bytes: int) -> tuple:
    """The reply for a task's return value: ("ok", JSON bytes) or an error reply, never an exception."""
    try:
        body = json.dumps(result, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        return ("error", type(exc).__name__, f"the task returned a value that is not JSON: {exc}"[:2000],
                traceback.format_exc())
    if len(body) > max_bytes:
        return ("too_large", len(body))
    return ("ok", body)


def _run_setup(task) -> tuple[Any, tuple | None]:
    try:
        return task.setup(), None
    except BaseException as exc:  # one task's broken setup must not take the others down
        return None, error_reply(exc)[1:]


def worker_main(conn: Connection, task_modules: str, nice: int, sched_idle: bool = False,
                cgroup: str | None = None, max_result_bytes: int = 1 << 62, marker: str = "") -> None:
    """A worker's whole life: set up once, then run one job at a time from its pipe."""
    os.setpgid(0, 0)  # its own process group: a kill takes whatever the job started along
    _die_with_parent()
    if marker:
        os.environ[WORKER_MARKER] = marker  # inherited by every process a task starts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops us; no Python-level handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the server
    signal.set_wakeup_fd(-1)
    try:  # inherited by what a task starts
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    except OSError:
        pass  # no /proc: the kernel's default choice
    os.nice(nice)
    if sched_idle:
        # Below every normal process, not just behind it: a waking event loop or nginx worker
        # preempts this worker at once, on any kernel scheduler (nice alone only tilts shares).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if cgroup is not None:
        cpu_priority.join(Path(cgroup))  # below every other group, not only this session's
    from services.slow import registry  # imported here: the forkserver preloads it

    try:
        tasks = registry.load(task_modules)
    except BaseException as exc:  # nothing could run here: the pool sees a worker that cannot start
        conn.send(("start_failed",) + error_reply(exc)[1:])
        return
    state: dict[str, Any] = {}
    broken: dict[str, tuple] = {}  # task name -> (type, message, traceback) of its failed setup
    for name, t in tasks.items():
        if t.setup is not None:
            state[name], failure = _run_setup(t)
            if failure is not None:
                broken[name] = failure
    conn.send(("ready", os.getpid(), broken))
    while True:
        try:
            name, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the pool closed our pipe: shut down
        t = tasks[name]
        if name in broken:  # the pool sends a job here only when the setup is due another try
            state[name], failure = _run_setup(t)
            if failure is not None:
                broken[name] = failure
                conn.send(("unavailable",) + failure)
                continue
            del broken[name]
        started = time.perf_counter()
        progress.reporting_to(conn.send)  # the task's progress reports go up the pipe before its reply
        try:
            result = t.fn(state[name], **kwargs) if t.setup is not None else t.fn(**kwargs)
            elapsed_ms = 1000 * (time.perf_counter() - started)
            reply = encode_result(result, max_result_bytes) + (elapsed_ms,)
        except BaseException as exc:  # converted here, so only plain strings cross the pipe
            reply = error_reply(exc)
        finally:
            progress.reporting_to(None)
        conn.send(reply)


# --- the pipe's framing, as the pool reads its end -------------------------------------------------

READ_CHUNK = 1 << 16  # bytes read from a worker's pipe per loop turn: a big result never blocks the loop (and a
# small one is not read into a 1 MiB buffer: os.read allocates its whole size, 13 us for 1 MiB)


class Frames:
    """Reassembles multiprocessing.Connection messages from a pipe read a chunk at a time.

    Connection.recv() reads a whole message in one blocking call: for a large result, the event
    loop would stop for its whole length. Here each loop turn reads one chunk (read).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()

    def read(self, fd: int) -> bool:
        """Add one chunk from the pipe; False when the worker's end is closed (it is exiting)."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:  # the pool's end is non-blocking: nothing more yet, the worker is there
            return True
        except OSError:
            data = b""
        self.buffer += data
        return bool(data)

    def drain(self, fd: int) -> None:
        """Read whatever is left in the pipe (a reply the worker sent just before it exited)."""
        while select.select([fd], [], [], 0)[0] and self.read(fd):
            pass

    def messages(self) -> Iterator[tuple]:
        """Each complete message, unpickled. One that arrived whole but does not unpickle here
        (bpo-31699) comes as the job's error: the pipe is still in step, so only that job fails."""
        while (frame := self.pop()) is not None:
            try:
                yield pickle.loads(frame)
            except Exception as exc:
                yield ("error", type(exc).__name__, f"the job's reply could not be read: {exc}", traceback.format_exc())

    def pop(self) -> bytes | None:
        """The next complete message (the pickle's bytes), or None until one has arrived."""
        buffer = self.buffer
        if len(buffer) < 4:
            return None
        (size,) = struct.unpack_from("!i", buffer)
        header = 4
        if size == -1:  # Connection's framing for messages over 2 GiB
            if len(buffer) < 12:
                return None
            (size,) = struct.unpack_from("!Q", buffer, 4)
            header = 12
        if len(buffer) < header + size:
            return None
        message = bytes(memoryview(buffer)[header:header + size])
        del buffer[:header + size]
        return message
