"""File modes of the state directory: nothing under it is readable by group or others.

Under systemd the unit's ``UMask=0077`` gives that for free. Outside it (a shell,
a container entrypoint, the fleet simulator) the umask is usually 022, and the
process umask is no tool here: it is process-wide, and many agents (and their
host program) may share a process. So whatever the agent creates under its
state directory is created with an explicit mode instead: directories 0700,
files 0600. SQLite creates a database's ``-wal`` and ``-shm`` files with the
database file's own mode, so creating the database file 0600 covers all three.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
OTHERS = 0o077  # group and others: read, write, search


def private_dirs(path: Path) -> None:
    """``mkdir -p`` where every directory it creates is 0700 (``Path.mkdir``'s parents get 0777 & ~umask)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        # Made meanwhile by another agent or thread: fine (a loose old one is tighten_tree's job).
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (then it is left as it is)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    os.close(fd)


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """``open(path, mode, opener=private_opener)`` creates the file 0600 rather than 0666 & ~umask."""
    return os.open(path, flags, PRIVATE_FILE)


def tighten_tree(root: Path) -> tuple[int, int] | None:
    """Take group and other permissions off ``root`` and, when it had any, off everything below it.

    Returns ``(root's old mode, entries changed below it)``, or None when ``root`` was
    already private. The walk happens only then (a state directory made by an older
    version or by hand), so a normal start costs one ``stat``. Symbolic links are
    neither followed nor changed (``chmod`` would change their target).
    """
    root = Path(root)
    old = stat.S_IMODE(root.stat().st_mode)
    if not old & OTHERS:
        return None
    root.chmod(old & ~OTHERS)
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode) or not st.st_mode & OTHERS:
                    continue
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~OTHERS)
                changed += 1
            except OSError:
                continue  # removed meanwhile, or not ours: the 0700 root already keeps others out
    return old, changed
