"""Image locking compatible with QEMU's file-posix: one byte per permission.

QEMU 7.2 marks what an open file description *takes* with a shared OFD lock on
byte ``100 + bit`` and what it *refuses to share* on byte ``200 + bit``
(bits of :mod:`blockdrv.perm`).  Holding is always a shared (read) lock, so
holders never block each other; conflicts are found by testing whether an
exclusive lock *could* be taken: taking permission ``p`` conflicts with anyone
holding ``200 + p``, and refusing to share ``p`` conflicts with anyone holding
``100 + p``.  Using the very same bytes makes qemu-img, qemu-io, qemu-nbd and
blockdrv exclude each other in both directions.

OFD locks (``F_OFD_SETLK``) belong to the open file description, not the
process, so two opens in one process exclude each other too, closing another
descriptor of the same file does not drop them, and the kernel releases them
when the last descriptor closes -- including when the process dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import PermissionConflictError
from ..perm import PERM_NAMES

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_GETLK = getattr(fcntl, "F_OFD_GETLK", None)

# None: not tried yet; False: the host has no OFD locks (locking then stays
# off, as QEMU's locking=auto does).
_supported: bool | None = None if _SETLK is not None else False


def lock_bytes(perm: int, shared: int) -> frozenset[int]:
    """The bytes that hold ``perm`` and refuse to share ``~shared``."""
    out = set()
    for bit in range(4):
        if perm & (1 << bit):
            out.add(LOCK_PERM_BASE + bit)
        if not shared & (1 << bit):
            out.add(LOCK_SHARED_BASE + bit)
    return frozenset(out)


def _fcntl(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(res)[0]


def available(fd: int) -> bool:
    """Whether this host takes OFD locks (asked once, on the first image)."""
    global _supported
    if _supported is None:
        try:
            _fcntl(fd, _GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE)
            _supported = True
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            _supported = False
    return _supported


def take(fd: int, offsets) -> None:
    for off in sorted(offsets):
        _fcntl(fd, _SETLK, fcntl.F_RDLCK, off)


def release(fd: int, offsets) -> None:
    for off in sorted(offsets):
        _fcntl(fd, _SETLK, fcntl.F_UNLCK, off)


def _held_by_others(fd: int, offset: int) -> bool:
    # GETLK ignores this description's own locks: only other holders answer.
    return _fcntl(fd, _GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def check(fd: int, perm: int, shared: int, path: str) -> None:
    """Raise if another description's locks conflict with ``perm``/``shared``,
    worded as QEMU words it (the first conflict, in QEMU's order)."""
    for bit in range(4):
        p = 1 << bit
        if perm & p and _held_by_others(fd, LOCK_SHARED_BASE + bit):
            _conflict(f'Failed to get "{PERM_NAMES[p]}" lock', path)
    for bit in range(4):
        p = 1 << bit
        if not shared & p and _held_by_others(fd, LOCK_PERM_BASE + bit):
            _conflict(f'Failed to get shared "{PERM_NAMES[p]}" lock', path)


def _conflict(message: str, path: str):
    raise PermissionConflictError(
        f"{message}\nIs another process using the image [{path}]?", filename=path)


def holders(fd: int) -> dict[int, bool]:
    """For tests and diagnostics: which lock bytes other descriptions hold."""
    offsets = [LOCK_PERM_BASE + b for b in range(4)] + [LOCK_SHARED_BASE + b for b in range(4)]
    return {off: _held_by_others(fd, off) for off in offsets}

