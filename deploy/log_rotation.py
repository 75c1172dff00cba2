"""Size-based rotation of nginx's logs, each on its own, run by the nginx launcher
(deploy/nginx_launch.py): a flood of refusals (nginx-refused.log) rotates only its own log.

supervisor rotates the logs it writes itself (supervisord's, every program's stdout) by size; nginx
writes its own files. The launcher checks their sizes every CHECK_INTERVAL seconds: past
observe.log_max_mb, the older copies move along (.1 -> .2 ..., the oldest past observe.log_backups
deleted), the file is copied to .1 and truncated in place. nginx opens its logs with O_APPEND, so
its next write lands at the start of the emptied file: no signal, no reopen. As with logrotate's
copytruncate, a line written in the instant between the copy's last read and the truncation is
lost; the copy reads again until the file stops growing, so that instant is short.

Why not rename and USR1 (nginx's own way): the workers (user nobody, when nginx runs as root)
reopen the files by path, and where the run dir is not traversable for them (a 0700 home or temp
dir) the reopen fails and they write on into the renamed file for good (measured here). Why not
logrotate: it needs a scheduler (cron or a systemd timer) and is not on a minimal Debian; run
every second from here it would only do this. Here the bound holds for any user, with nothing
installed.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECK_INTERVAL = 0.5  # seconds (two stat calls): a flood overshoots the size by what it writes in this time
ROTATED = ("nginx-access.log", "nginx-refused.log", "nginx-error.log")


def limits(snapshot: Path) -> tuple[int, int]:
    """(max bytes, backups) from the fleet's settings snapshot; read at each check, so a deploy that
    changes them applies without restarting nginx."""
    values = json.loads(snapshot.read_text())["values"]
    return values["observe.log_max_mb"] << 20, values["observe.log_backups"]


def rotate_if_over(path: Path, max_bytes: int, backups: int) -> bool:
    """Shift `path` to .1 (and .1 to .2, ...) if it is over `max_bytes`; True if it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    path.with_name(f"{path.name}.{backups}").unlink(missing_ok=True)
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{n + 1}"))
    copy = path.with_name(f"{path.name}.1.tmp")
    with open(path, "r+b") as log, open(copy, "wb") as out:
        while chunk := log.read(1 << 20):  # to the end, and again while nginx appends
            out.write(chunk)
        log.truncate(0)
    copy.rename(path.with_name(f"{path.name}.1"))
    return True


def rotate(log_dir: Path, snapshot: Path) -> list[str]:
    """Rotate each of nginx's logs that is over its size; the names of those rotated."""
    try:
        max_bytes, backups = limits(snapshot)
    except (OSError, ValueError, KeyError):
        return []  # a snapshot being replaced, or from an older version: the next check
    return [name for name in ROTATED if rotate_if_over(log_dir / name, max_bytes, backups)]
