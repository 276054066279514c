"""The driver contract: one pluggy hookspec per QEMU ``BlockDriver`` callback.

A driver is a plugin object with identity fields and implementations of the
hooks below.  Identity fields, read by :mod:`blockdrv.plugins`:

``format_name``
    for format drivers (``"raw"``, ``"vhdx"``); ``None`` for protocols.
``protocol_name``
    for protocol drivers (``"file"``, ``"memory"``); ``None`` for formats.
``create_opts``
    optional: a list of :class:`blockdrv.options.CreateOption` (the static
    form of :func:`bdrv_create_opts`).

Hooks marked *bound* are never broadcast: each node binds, at open time, the
implementation of its own driver (see :class:`blockdrv.plugins.BoundDriver`),
so one request reaches one driver.  ``bdrv_probe`` is the one broadcast hook.

Offsets and lengths are bytes.  ``bdrv_co_*`` hooks are coroutines; the
generic layer (:mod:`blockdrv.node`) has already checked bounds, alignment to
``bs.request_alignment`` and read-only state before calling them.  Drivers
raise :class:`blockdrv.errors.BlockDriverError` subclasses, nothing else.

Capabilities derive from presence: a driver without ``bdrv_co_pdiscard``
does not discard, one without ``bdrv_co_truncate`` cannot be resized.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

# pluggy's own markers' attributes, set without importing pluggy (start-up;
# see blockdrv._startup): pluggy registers drivers marked with them as usual
from ._startup import PROJECT, hookimpl, hookspec

if TYPE_CHECKING:  # pragma: no cover
    from .iov import IOVector
    from .common import BlockStatus, CheckResult, DriverInfo, SnapshotInfo
    from .node import BlockDriverState
    from .options import CreateOption



@hookspec
def bdrv_probe(buf: bytes, filename: str | None) -> int | None:
    """Score 0..100 how surely ``buf`` (the image's first 512 bytes, zero-padded
    as qemu's probe buffer; ``filename`` may be None) is this format.

    Broadcast to every format driver; the highest score wins.  ``raw`` answers
    1 so that it is chosen only when nothing else claims the image.  Return
    ``None`` or 0 for "not mine".  Must not raise on any input.
    """


@hookspec(firstresult=True)
def bdrv_open(bs: "BlockDriverState", options: dict[str, Any], flags: int) -> None:
    """Bound.  Open ``bs``: validate the image and fill ``bs.opaque``,
    ``bs.total_size`` and ``bs.request_alignment``.

    Format drivers read through ``bs.file`` (already open); protocol drivers
    open ``bs.filename``.  ``flags`` holds ``O_RDWR`` and friends.  A format
    driver must not write to an image it has not fully validated.
    """


@hookspec(firstresult=True)
def bdrv_close(bs: "BlockDriverState") -> None:
    """Bound.  Make the image consistent on disk and release resources.

    Called once; the generic layer closes ``bs.file`` afterwards.
    """


@hookspec(firstresult=True)
def bdrv_reopen_prepare(bs: "BlockDriverState", flags: int) -> None:
    """Bound.  Check that ``bs`` can switch to ``flags`` (read-only <-> read-write).

    Raise to refuse; nothing may change until commit.
    """


@hookspec(firstresult=True)
def bdrv_reopen_commit(bs: "BlockDriverState", flags: int) -> None:
    """Bound.  Apply the switch prepared by :func:`bdrv_reopen_prepare`; must not fail."""


@hookspec(firstresult=True)
def bdrv_reopen_abort(bs: "BlockDriverState", flags: int) -> None:
    """Bound.  Undo whatever :func:`bdrv_reopen_prepare` did."""


@hookspec(firstresult=True)
def bdrv_child_perm(bs: "BlockDriverState", perm: int, shared: int) -> tuple[int, int]:
    """Bound, format drivers.  The permissions (``blockdrv.perm.PERM_*``) this
    node takes on ``bs.file`` and shares with other users of it, given what
    the node's own user takes (``perm``) and shares (``shared``).

    Absent: QEMU's default for a file that holds metadata and data -- consistent
    read, write and resize when the node is writable, and nobody else may write
    or resize the file.  A format that only passes data through (``raw``)
    returns ``perm, shared`` unchanged.  ``force-share=on`` is applied after.
    """


@hookspec(firstresult=True)
def bdrv_check_backing(bs: "BlockDriverState", backing: "BlockDriverState") -> None:
    """Bound, format drivers with a backing chain.  The core has opened the
    parent ``bs`` names (``bs.backing_file``/``backing_candidates``, see
    :mod:`blockdrv.backing`), read-only: raise to refuse it (a VHDX child
    checks the parent's DataWriteGuid against its linkage).  The core then
    closes it and the open fails.

    Absent: any parent the names lead to is accepted.
    """


@hookspec(firstresult=True)
def bdrv_check_perm(bs: "BlockDriverState", perm: int, shared: int) -> None:
    """Bound, protocol drivers.  Prepare to take ``perm`` and share only
    ``shared``: acquire what is needed and raise ``PermissionConflictError``
    if another user (another process) holds something incompatible.  Followed
    by :func:`bdrv_set_perm` or :func:`bdrv_abort_perm_update`.

    Absent: the protocol has nothing to lock (memory, network); the generic
    layer passes permissions through filters (nodes with a ``file`` child)."""


@hookspec(firstresult=True)
def bdrv_set_perm(bs: "BlockDriverState", perm: int, shared: int) -> None:
    """Bound.  Commit what :func:`bdrv_check_perm` prepared, releasing what the
    new permissions no longer need; must not fail."""


@hookspec(firstresult=True)
def bdrv_abort_perm_update(bs: "BlockDriverState") -> None:
    """Bound.  Return to the permissions held before :func:`bdrv_check_perm`."""


@hookspec(firstresult=True)
async def bdrv_co_readv(bs: "BlockDriverState", offset: int, nbytes: int,
                        qiov: "IOVector") -> None:
    """Bound, coroutine.  Fill ``qiov`` (exactly ``nbytes`` long) with guest data
    from ``offset``.  The range is in bounds and aligned."""


@hookspec(firstresult=True)
async def bdrv_co_writev(bs: "BlockDriverState", offset: int, nbytes: int,
                         qiov: "IOVector", flags: int) -> None:
    """Bound, coroutine.  Write ``qiov`` at ``offset``.  In bounds, aligned,
    and the node is writable.  ``flags`` may carry ``WRITE_FUA``."""


@hookspec(firstresult=True)
async def bdrv_co_pwritev_compressed(bs: "BlockDriverState", offset: int, nbytes: int,
                                     qiov: "IOVector") -> None:
    """Bound, coroutine.  Write ``qiov`` at ``offset`` compressed (QEMU's
    ``bdrv_co_pwritev_compressed_part``, a write with
    ``BDRV_REQ_WRITE_COMPRESSED``).  ``offset`` is cluster aligned and
    ``nbytes`` whole clusters, or ends at the end of the image; a driver may
    store data it cannot compress uncompressed.  ``nbytes == 0`` is the
    end-of-copy signal (qcow2 rounds its file up to a whole sector).

    Absent: the format cannot store compressed data; ``convert -c`` to it is
    refused before the target is created ("Compression not supported for
    this file format") and compressed writes fail with ``UnsupportedError``."""


@hookspec(firstresult=True)
async def bdrv_co_flush(bs: "BlockDriverState") -> None:
    """Bound, coroutine.  Make every completed write of this node durable at
    this level; the generic layer then flushes ``bs.file``."""


@hookspec(firstresult=True)
async def bdrv_co_pwrite_zeroes(bs: "BlockDriverState", offset: int, nbytes: int,
                                flags: int) -> None:
    """Bound, coroutine.  Make ``[offset, offset+nbytes)`` read as zeros, cheaper
    than writing a zero buffer.  ``flags`` may carry ``WRITE_UNMAP`` (the
    range may be deallocated).  Raise ``UnsupportedError`` to make the generic
    layer fall back to writing zeros."""


@hookspec(firstresult=True)
async def bdrv_co_pdiscard(bs: "BlockDriverState", offset: int, nbytes: int) -> None:
    """Bound, coroutine.  Hint that the range is no longer needed; its content
    is afterwards undefined (zeros or old data).  Absent: discard is a no-op."""


@hookspec(firstresult=True)
async def bdrv_co_block_status(bs: "BlockDriverState", want_zero: bool, offset: int,
                               nbytes: int) -> "BlockStatus":
    """Bound, coroutine.  Describe the allocation of the range starting at
    ``offset``: a :class:`blockdrv.node.BlockStatus` whose ``pnum`` (> 0,
    <= nbytes) says how far the answer holds."""


@hookspec(firstresult=True)
async def bdrv_co_truncate(bs: "BlockDriverState", offset: int, exact: bool,
                           prealloc: str) -> None:
    """Bound, coroutine.  Resize the node to ``offset`` bytes (grow or shrink)
    and update ``bs.total_size``."""


@hookspec(firstresult=True)
def bdrv_create(filename: str, options: dict[str, Any]) -> None:
    """Called on one driver, by format name: create a new image at ``filename``.

    ``options`` are the parsed ``-o`` options (``size`` included) checked
    against :func:`bdrv_create_opts`.  Validate everything before the first
    write; on failure the generic layer removes the file it created.
    """


@hookspec(firstresult=True)
def bdrv_create_opts() -> list["CreateOption"]:
    """Called on one driver: the options ``create`` accepts, in ``-o help`` order."""


@hookspec(firstresult=True)
def bdrv_get_info(bs: "BlockDriverState") -> "DriverInfo":
    """Bound.  Cluster size, dirty flag and the format-specific section of
    ``info``."""


@hookspec(firstresult=True)
def bdrv_snapshot_list(bs: "BlockDriverState") -> "list[SnapshotInfo]":
    """Bound (QEMU's ``bdrv_snapshot_list``).  The image's internal
    snapshots in the order the image stores them; an empty list when it has
    none.  Reads metadata only (``info`` opens with ``O_NO_IO``) and must
    not write.  Absent: the format has no internal snapshots -- ``info``
    shows no snapshot list and ``snapshot -l`` fails as qemu-img does for
    such a format ("snapshots not supported")."""


@hookspec(firstresult=True)
def bdrv_check(bs: "BlockDriverState", fix: int) -> "CheckResult":
    """Bound.  Count corruptions and leaks; repair them when ``fix`` has
    ``FIX_LEAKS``/``FIX_ERRORS``.  Must not write when ``fix`` is 0."""


@hookspec(firstresult=True)
def bdrv_has_zero_init(bs: "BlockDriverState") -> bool:
    """Bound.  True when a freshly created image of this driver reads as zeros
    (convert then skips writing zero ranges)."""


@hookspec(firstresult=True)
def bdrv_get_allocated_file_size(bs: "BlockDriverState") -> int:
    """Bound.  Bytes of host storage used (``actual-size``).  Absent: the sum
    over the node's children."""


@hookspec(firstresult=True)
async def bdrv_make_empty(bs: "BlockDriverState") -> None:
    """Bound, coroutine, formats with a backing chain (QEMU's
    ``bdrv_make_empty``).  Drop everything ``bs`` allocates so that every
    range reads from the backing chain again (``commit`` empties the image
    it committed).  Crash-safe: after a power cut each range reads either
    this image's old data or the parent's.  Absent: the format cannot be
    emptied (``commit`` without ``-d`` refuses it)."""


@hookspec(firstresult=True)
async def bdrv_change_backing_file(bs: "BlockDriverState", backing_file: str,
                                   backing_fmt: str | None,
                                   backing: "BlockDriverState | None") -> None:
    """Bound, coroutine, formats with a backing chain (QEMU's
    ``bdrv_change_backing_file``).  Record ``backing_file`` (as the user
    gave it; relative names are taken against ``bs``'s directory) and
    ``backing_fmt`` as ``bs``'s parent, in one crash-safe metadata update;
    the data of ``bs`` is not touched.  ``backing`` is the new parent when
    the caller has it open: a format that binds to its parent's identity
    (VHDX's parent_linkage) reads it there.  When ``backing`` is open
    read-write the caller is about to write it: ``bs`` must stay valid
    across those writes (VHDX registers the parent's next DataWriteGuid
    before it is used).  Updates ``bs.backing_file``/``backing_format``."""


@hookspec(firstresult=True)
def bdrv_measure(options: dict[str, Any], in_bs: "BlockDriverState | None",
                 size: int | None) -> dict[str, int]:
    """Called on one driver, by format name (QEMU's ``bdrv_measure``): the
    host file size a new image of this format with create ``options``
    (parsed) needs to hold ``in_bs``'s data (its backing chain included), or
    an empty disk of ``size`` bytes when ``in_bs`` is None.  Returns
    ``{"required": N, "fully-allocated": M}``: ``required`` is at least what
    ``convert`` then writes, ``fully-allocated`` what every block allocated
    takes.  Absent: the format cannot be measured."""
