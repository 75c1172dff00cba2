"""A temporary directory of its own for each supervised program, in the run dir, emptied as it starts.

supervisord names it (FLEET_PROGRAM_TMP=<run dir>/home/tmp/<program>); the program makes it its
TMPDIR before anything asks for one. Why: multiprocessing's forkserver (the slow pool's) keeps its
socket in a pymp-* directory under TMPDIR, which a clean exit removes and a kill -9 leaves behind.
In the shared /tmp one was left for good per killed instance (three in a 30-minute soak); here the
program's next start, the only one under that name, empties what its killed predecessor left.
"""

from __future__ import annotations

import os
import shutil
import tempfile

ENV = "FLEET_PROGRAM_TMP"
# A forkserver's socket is TMPDIR/pymp-<8>/listener-<8>, and a Unix socket's path has 107 bytes at
# most: a longer TMPDIR (a deep run dir) keeps the system's.
MAX_CHARS = 72


def take_own() -> str | None:
    """Empty the program's directory and make it TMPDIR (for this process and its children);
    None, and TMPDIR left as it was, when supervisord named none or its path is too long."""
    path = os.environ.get(ENV, "")
    if not path or len(path) > MAX_CHARS:
        return None
    shutil.rmtree(path, ignore_errors=True)  # a link is not followed: rmtree refuses one
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None  # tempfile caches its choice: make it look again
    return path
