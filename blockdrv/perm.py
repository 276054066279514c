"""Permissions between the users of a node, as QEMU's block layer names them.

A node's parent *takes* some permissions on it (``perm``) and *shares* others
with everybody else (``shared``).  The ``file`` protocol turns both into
byte-range locks on the image file (``protocols/file_lock.py``), so two
processes -- blockdrv or qemu -- that would corrupt each other's view of an
image cannot both hold it.  The bits and their names are QEMU 7.2's
``BLK_PERM_*``: the lock bytes are derived from them, so they must not change.
"""

from __future__ import annotations

from .common import O_FORCE_SHARE, O_NO_IO, O_RDWR, O_RESIZE

PERM_CONSISTENT_READ = 0x01   # reads see what was last written (no one else changes it)
PERM_WRITE = 0x02             # writes that may change what readers see
PERM_WRITE_UNCHANGED = 0x04   # writes that never change the guest-visible data
PERM_RESIZE = 0x08
PERM_ALL = 0x0F

PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}


def user_perm(flags: int) -> tuple[int, int]:
    """What the opener of an image takes and shares (QEMU's ``blk_new_open``):
    consistent reads unless only metadata is looked at, write when read-write,
    resize when asked for; everything shared."""
    perm = 0
    if not flags & O_NO_IO:
        perm |= PERM_CONSISTENT_READ
        if flags & O_RDWR:
            perm |= PERM_WRITE
    if flags & O_RESIZE:
        perm |= PERM_RESIZE
    return perm, PERM_ALL


def storage_child_perm(flags: int, perm: int, shared: int) -> tuple[int, int]:
    """What a format node takes on its ``file`` child by default (QEMU's
    ``bdrv_default_perms_for_storage``, metadata and data in one file): its
    metadata must stay consistent, so nobody else may write or resize the
    file; a writable format may write and grow it at any time."""
    if flags & O_RDWR:
        perm |= PERM_WRITE | PERM_RESIZE
    if not flags & O_NO_IO:
        perm |= PERM_CONSISTENT_READ
    return perm, shared & ~(PERM_WRITE | PERM_RESIZE)


def child_perm(drv, bs, flags: int) -> tuple[int, int]:
    """The permissions a node opened with ``flags`` by driver ``drv`` takes on
    the node below it: the driver's ``bdrv_child_perm`` if it has one, else the
    storage default; ``force-share=on`` then shares everything."""
    perm, shared = user_perm(flags)
    if drv.protocol_name and not drv.format_name:
        pass                                   # a protocol opened directly: the user's own
    elif drv.bdrv_child_perm is not None:
        perm, shared = drv.bdrv_child_perm(bs, perm, shared)
    else:
        perm, shared = storage_child_perm(flags, perm, shared)
    if flags & O_FORCE_SHARE:
        shared = PERM_ALL
    return perm, shared
