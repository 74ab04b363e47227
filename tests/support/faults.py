"""Injected store faults that make the real system calls fail, for root as for anyone.

The tests run as root, and root ignores file modes, so `chmod a-w` does not make a file
read-only for them, and a filesystem cannot be remounted read-only while a process holds a
file on it open for writing (EBUSY). The immutable attribute (`chattr +i`, set here with the
ioctl so that no tool is needed) stops root too: on ext4 a write to an immutable file through
a descriptor opened before fails with EPERM, and creating or deleting a file in an immutable
directory fails likewise. SQLite reports such a failed write as SQLITE_IOERR_WRITE
("disk I/O error"), exactly what it reports when the disk returns EIO or when the filesystem
is remounted read-only under it after an error (EROFS).
"""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010


def set_immutable(path: Path, immutable: bool) -> None:
    """Set or clear the immutable attribute of a file or directory (needs CAP_LINUX_IMMUTABLE)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if immutable:
            flags[0] |= _FS_IMMUTABLE_FL
        else:
            flags[0] &= ~_FS_IMMUTABLE_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


def immutable_stops_open_writers(directory: Path) -> str | None:
    """None when an immutable file in `directory` refuses writes through a descriptor opened
    before; otherwise why not (not root, a filesystem without the attribute, or one such as
    tmpfs that still lets open descriptors write)."""
    probe = directory / ".immutable-probe"
    try:
        with probe.open("wb") as out:
            set_immutable(probe, True)
            try:
                out.write(b"x")
                out.flush()
            except PermissionError:
                return None
            finally:
                set_immutable(probe, False)
        return f"an immutable file on {directory}'s filesystem is still writable when open"
    except OSError as error:
        return f"cannot set the immutable attribute in {directory}: {error}"
    finally:
        probe.unlink(missing_ok=True)


class Immutable:
    """Makes `paths` immutable on `inject()` until `clear()`; as a context manager it clears
    on the way out whatever happened (an immutable file left behind could not even be
    deleted by the tests' temporary-directory clean-up)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._set: list[Path] = []

    def inject(self) -> None:
        for path in self.paths:
            set_immutable(path, True)
            self._set.append(path)

    def clear(self) -> None:
        while self._set:
            set_immutable(self._set.pop(), False)

    def __enter__(self) -> Immutable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()
