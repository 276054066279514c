"""The values drivers and the generic layer exchange (QEMU's block-common.h).

Open flags, request flags, block-status bits and the small records hooks
return.  This module imports nothing from the rest of blockdrv, so the driver
contract (:mod:`blockdrv.hookspecs`), the node and every driver can use it
without import cycles.  Driver authors get all of it from
:mod:`blockdrv.driver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from .node import BlockDriverState

# -- open flags (QEMU's BDRV_O_*), in ``bs.open_flags`` and every ``flags`` -------

O_RDWR = 0x0002       # read-write; without it the generic layer refuses every write
O_RESIZE = 0x0004     # the opener may resize the image (qemu-img resize): take the resize lock
O_NOCACHE = 0x0020    # cache=none/directsync: the file protocol opens with O_DIRECT
O_NO_BACKING = 0x0100 # do not open the backing chain (qemu-img info)
O_NO_FLUSH = 0x0200   # cache=unsafe: flushes and FUA never reach the disk
O_CHECK = 0x1000      # opened by `check`: the driver may defer repairs to bdrv_check
O_UNMAP = 0x4000      # discard=unmap: discards reach the driver (else dropped)
O_PROTOCOL = 0x8000   # the node is a protocol node under a format node
O_NO_IO = 0x10000     # metadata only, no guest I/O (qemu-img info): no "consistent read" lock
# blockdrv's spelling of QEMU's ``force-share=on`` option (qemu-img -U): share
# every permission with other processes; read-only opens only.
O_FORCE_SHARE = 0x100000

# -- request flags (QEMU's BDRV_REQ_*), the ``flags`` of writes -------------------

WRITE_FUA = 0x1           # durable when the write completes
WRITE_UNMAP = 0x4         # a zero write may deallocate the range
WRITE_NO_FALLBACK = 0x10  # a zero write must not fall back to writing a zero buffer

# -- block status bits (QEMU's BDRV_BLOCK_*), ``BlockStatus.flags`` ---------------

BLOCK_DATA = 0x01          # reads come from this node's (or ``file``'s) data
BLOCK_ZERO = 0x02          # reads return zeros
BLOCK_OFFSET_VALID = 0x04  # ``map`` is the host offset in ``BlockStatus.file``
BLOCK_RAW = 0x08           # ask ``file`` at ``map`` instead (raw-like formats)
BLOCK_ALLOCATED = 0x10     # set by the generic layer: this layer answers for the range
BLOCK_EOF = 0x20           # set by the generic layer: the range reaches the end
BLOCK_RECURSE = 0x40       # DATA at OFFSET_VALID: also ask ``file`` whether it reads as
                           # zeros there (a host hole); without it the range stays DATA,
                           # as a driver that reports whole allocated blocks wants

# -- preallocation modes (QEMU's PreallocMode) ------------------------------------

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
# what a plain file can do: it has no metadata to preallocate
FILE_PREALLOC_MODES = ("off", "falloc", "full")

# -- check repair flags (QEMU's BdrvCheckMode) -------------------------------------

FIX_LEAKS = 1
FIX_ERRORS = 2


class BlockStatus(NamedTuple):
    """Answer of ``bdrv_co_block_status`` for ``[offset, offset + pnum)``."""

    flags: int
    pnum: int
    map: int = 0                        # host offset in ``file`` when OFFSET_VALID
    file: "BlockDriverState | None" = None


@dataclass
class DriverInfo:
    """What ``bdrv_get_info`` reports (QEMU's BlockDriverInfo + ImageInfoSpecific):
    ``format_specific`` becomes the ``format-specific`` section of ``info``."""

    cluster_size: int = 0
    is_dirty: bool = False
    format_specific: dict[str, Any] | None = None
    # internal snapshots as qemu's SnapshotInfo dicts (``info``'s "snapshots")
    snapshots: list[dict[str, Any]] | None = None


@dataclass
class CheckResult:
    """qemu-img check's counters; JSON keys are the dashed field names.
    ``messages`` are printed one per line before the summary."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    messages: list[str] = field(default_factory=list)


# -- alignment ----------------------------------------------------------------------

def round_down(value: int, align: int) -> int:
    return value - value % align


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def is_aligned(value: int, align: int) -> bool:
    return value % align == 0
