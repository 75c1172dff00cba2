"""What deploy makes in the run dir, as root, without ever acting on another user's link.

Deployed by root, the fleet's processes run as another user (process.user), who writes some
directories of the run dir. Root must never follow a link that user (or any other) could have
planted, nor remove or hand over anything it did not make itself. So:

- the run dir, and every directory above it, can be changed only by root or the deploying user
  (a sticky directory such as /tmp is fine: nobody else can rename what we made in it);
- directories root keeps are made by root, exclusively, and checked to be real directories it owns
  before each use;
- a file the fleet's user reads (a TLS key, the edge's token) is created by root in a directory of
  root's, under a fresh name that cannot exist yet, and handed over by its descriptor;
- a directory the fleet's user writes in is made by root and handed over by its descriptor; root
  never walks into it to change owners;
- removing a tree uses shutil.rmtree's descriptor-based walk, which unlinks links and never
  follows them (shutil.rmtree.avoids_symlink_attacks), and only on a path whose parents are root's.

Deployed by an ordinary user, the same code runs with that user in root's place.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path


class RunDirError(RuntimeError):
    """Something in or around the run dir the user must fix; the message says what."""


class UnsafePath(RunDirError):
    """A path root would act on could be changed by another user; the message says which and why."""


def owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_not_writable_by_others(path: Path, what: str) -> None:
    """`path` and every directory above it can be changed only by root or the deploying user.

    Like OpenSSH's StrictModes: a directory another user may write lets that user swap what we
    make below it (a config root reads, a directory root removes) for a link of theirs. A sticky
    directory (/tmp) is fine above us: others cannot rename or remove what is not theirs there.
    """
    me = os.geteuid()
    for directory in [path, *path.parents]:
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            continue  # made later, by us
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{what} {path}: {directory} is a symbolic link")
        if st.st_uid not in (0, me):
            raise UnsafePath(f"{what} {path}: {directory} belongs to {owner_name(st.st_uid)}, who could "
                             f"replace what the fleet makes there; use a directory of your own")
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable_by_others and not (st.st_mode & stat.S_ISVTX and directory != path):
            raise UnsafePath(f"{what} {path}: {directory} may be written by other users (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); use a directory only you can write")


def own_dir(path: Path, mode: int = 0o755) -> None:
    """A directory of the deploying user's: made now (with its parents) if missing, else checked to
    be a real directory of ours that nobody else may write. A new one gets `mode` whatever the
    umask, so that the fleet's user can traverse it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.exists():
            own_dir(path.parent, mode)
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # the parent is ours: nobody swapped it between the two calls
            return
        except FileExistsError:
            st = os.lstat(path)  # made meanwhile: checked as any other
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        what = "a link" if stat.S_ISLNK(st.st_mode) else f"owner {owner_name(st.st_uid)}"
        raise UnsafePath(f"{path} is not a directory of {owner_name(os.geteuid())}'s that only it may write "
                         f"({what}, mode {stat.S_IMODE(st.st_mode):o}); remove it")


def handed_over_dir(path: Path, uid: int, gid: int, mode: int = 0o755) -> None:
    """A directory the fleet's user writes in (its home, Dask's local directories): made by root
    and handed over by descriptor. One that is already that user's real directory is kept as it is,
    never walked into; anything else there (root's, from a fleet that ran as root; a link) goes."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return
        remove_tree(path)
    except FileNotFoundError:
        pass
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o644, uid: int | None = None, gid: int | None = None) -> None:
    """Replace `path` atomically with a file root creates under a fresh name (O_EXCL, O_NOFOLLOW:
    nothing planted there can be written through) and hands to uid/gid by its descriptor."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fchmod(fd, mode)
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def read_file(path: Path) -> bytes | None:
    """A regular file's bytes, never through a link; None if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafePath(f"{path} is not a regular file")
        return f.read()


def remove_tree(path: Path) -> None:
    """Remove a file or a tree without following any link in it (a link itself is unlinked)."""
    assert shutil.rmtree.avoids_symlink_attacks  # Linux: rmtree walks by descriptor
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
