"""The public Python API: images you can read and write without asyncio, and
the engines behind the commands (convert, compare, check) as functions."""

from __future__ import annotations

import os
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

from . import block
from .errors import InvalidArgumentError
from .common import O_FORCE_SHARE, O_RDWR, O_UNMAP, BlockStatus, CheckResult, DriverInfo
from .node import BlockDriverState
from .options import parse_size

if TYPE_CHECKING:       # the engines are imported when first used
    from .engines.compare import CompareResult


class ProbedRawWarning(UserWarning):
    """A writable image was opened without a format and probed as raw."""


class Image:
    """An open image.  Offsets and lengths are bytes; any alignment works.

    >>> with blockdrv.open_image("disk.vhdx", readonly=False) as img:
    ...     img.write(0, b"hello")
    ...     img.read(0, 5)
    """

    def __init__(self, bs: BlockDriverState) -> None:
        self.bs = bs

    @property
    def size(self) -> int:
        return self.bs.total_size

    @property
    def format(self) -> str:
        return self.bs.format_name

    @property
    def filename(self) -> str | None:
        return self.bs.filename

    @property
    def readonly(self) -> bool:
        return self.bs.read_only

    def read(self, offset: int, nbytes: int) -> bytes:
        return bytes(self.bs.pread(offset, nbytes))

    def readinto(self, offset: int, buf) -> None:
        from .iov import IOVector
        self.bs.preadv(offset, IOVector.from_buffer(buf))

    def write(self, offset: int, data) -> None:
        self.bs.pwrite(offset, data)

    def write_zeroes(self, offset: int, nbytes: int, unmap: bool = False) -> None:
        from .common import WRITE_UNMAP
        self.bs.pwrite_zeroes(offset, nbytes, WRITE_UNMAP if unmap else 0)

    def discard(self, offset: int, nbytes: int) -> None:
        self.bs.pdiscard(offset, nbytes)

    def flush(self) -> None:
        self.bs.flush()

    def resize(self, size: int | str) -> None:
        self.bs.truncate(parse_size(size))

    def block_status(self, offset: int, nbytes: int) -> BlockStatus:
        """Allocation of the range at ``offset`` as the guest sees it, backing
        chain included (``qemu-img map``'s view; ``pnum`` says how far it
        holds)."""
        from .mapping import block_status
        return block_status(self.bs, offset, nbytes)

    def info(self) -> DriverInfo:
        return self.bs.get_info()

    def check(self, fix: int = 0) -> CheckResult:
        return self.bs.check(fix)

    def close(self) -> None:
        self.bs.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Image {self.format} {self.filename!r} size={self.size}>"


def open_image(path: str | os.PathLike, fmt: str | None = None, readonly: bool = True,
               force_share: bool = False, **options: Any) -> Image:
    """Open an image; ``fmt=None`` probes the format.

    The image is locked as QEMU locks it, so qemu and other blockdrv
    processes cannot write it while it is open (nor open it while it is
    written).  ``force_share=True`` (qemu-img's ``-U``, read-only only) takes
    no lock that would keep a writer out.  ``discard="unmap"`` (the default
    here, as in qemu-io) passes :meth:`Image.discard` down to the driver;
    ``discard="ignore"`` drops discards.  VHDX images change block states
    for discards only with an explicit ``discard="unmap"`` (qemu's vhdx
    driver ignores them).
    """
    flags = (0 if readonly else O_RDWR) | (O_FORCE_SHARE if force_share else 0)
    if "discard" not in options:
        # As qemu-io: discards pass down by default (O_UNMAP), but not as the
        # explicit option that lets vhdx turn them into block states.
        flags |= O_UNMAP
    bs = block.open_node(os.fspath(path), fmt, flags, options)
    if bs.probed_raw and not readonly:
        # The CLI prints qemu's warning here; the API speaks Python's way.
        # Either way the node keeps refusing writes that would make block 0
        # probe as another format.
        import warnings
        try:
            warnings.warn(f"Image format was not specified for '{bs.filename}' and "
                          "probing guessed raw: writes to block 0 that would make it "
                          "look like another format are refused; pass fmt='raw' to "
                          "remove the restriction", ProbedRawWarning, stacklevel=2)
        except BaseException:   # warnings turned into errors: do not leak the node
            bs.close()
            raise
    return Image(bs)


def create_image(path: str | os.PathLike, fmt: str, size: int | str | None = None,
                 readonly: bool = False, **options: Any) -> Image:
    """Create an image (options as qemu-img ``-o``) and return it opened.

    ``backing_file=`` (and ``backing_fmt=``) make a differencing image, as
    ``qemu-img create -b ... -F ...``: a relative name is taken against the
    new image's directory, and ``size=None`` inherits the backing file's size.
    """
    if size is None and not options.get("backing_file"):
        raise InvalidArgumentError("Image creation needs a size parameter")
    opts = {} if size is None else {"size": parse_size(size)}
    opts.update({k: os.fspath(v) if isinstance(v, os.PathLike) else v
                 for k, v in options.items()})
    block.create(os.fspath(path), fmt, opts)
    return open_image(path, fmt, readonly=readonly)


# -- the engines behind the commands (blockdrv.engines) ------------------------------

def convert(sources: str | os.PathLike | Sequence[str | os.PathLike],
            target: str | os.PathLike, *, fmt: str = "raw", src_fmt: str | None = None,
            options: dict[str, Any] | None = None, sparse_size: int = 4096,
            coroutines: int = 1, out_of_order: bool = False, cache: str = "unsafe",
            src_cache: str = "writeback", skip_create: bool = False,
            force_share: bool = False,
            progress: Callable[[float], Any] | None = None,
            compressed: bool = False) -> None:
    """Copy ``sources`` into a new image ``target`` (``qemu-img convert``).

    ``sources``: one image or a list, concatenated in order (``src_fmt``
    probed when None).  ``target`` is created in ``fmt`` with create
    ``options`` (as :func:`create_image`'s; its size is the sources' total)
    unless ``skip_create``, which writes into an existing image at least
    that large.  Zero ranges are left unwritten when the new target reads as
    zeros; in data, runs of zeros of ``sparse_size`` bytes or more (a
    multiple of 512; 0 writes every byte) stay holes.  ``coroutines`` (1-16)
    requests run at once, written in order unless ``out_of_order``.
    ``cache``/``src_cache`` are qemu cache modes (``"unsafe"`` never
    flushes until the end; ``"none"`` uses O_DIRECT); ``force_share`` opens
    the sources without locks keeping writers out.  ``progress(fraction)``
    is called as the copy advances, up to 1.0; an exception it raises stops
    the copy.  ``compressed`` (``-c``) writes every target cluster
    compressed, for formats that can (qcow2); others are refused.

    A target that is one of the sources (any name, link or backing file) is
    refused before anything is written; on any failure a target this call
    created is removed.  Errors are :class:`BlockDriverError` subclasses.
    """
    from .engines import convert as engine
    engine.convert(sources, target, fmt=fmt, src_fmt=src_fmt, options=options,
                   sparse_size=sparse_size, coroutines=coroutines,
                   out_of_order=out_of_order, cache=cache, src_cache=src_cache,
                   skip_create=skip_create, force_share=force_share, progress=progress,
                   compressed=compressed)


def compare(a: str | os.PathLike, b: str | os.PathLike, *, fmt_a: str | None = None,
            fmt_b: str | None = None, strict: bool = False, force_share: bool = False,
            progress: Callable[[float], Any] | None = None) -> CompareResult:
    """Compare two images as the guest sees them (``qemu-img compare``).

    Returns a :class:`CompareResult`: ``identical``, else ``mismatch`` and
    ``offset``, the first differing 512-byte sector.  Images of different
    sizes are identical when the longer one's extra part reads as zeros
    (``size_mismatch`` tells); ``strict=True`` also requires equal sizes
    (``mismatch == "size"``) and equal allocation (``"block-status"``).
    Formats are probed unless ``fmt_a``/``fmt_b``; ``progress`` as for
    :func:`convert`.
    """
    from .engines.compare import compare as engine
    return engine(a, b, fmt_a=fmt_a, fmt_b=fmt_b, strict=strict, force_share=force_share,
                  progress=progress)


def check(path: str | os.PathLike, repair: str | None = None, *, fmt: str | None = None,
          force_share: bool = False) -> CheckResult:
    """Check an image's consistency (``qemu-img check``).

    ``repair``: None (only look), ``"leaks"`` or ``"all"`` (also fix
    corruptions); a repair opens the image read-write, and the image is then
    checked again, as qemu-img does: the counters are the second pass's,
    ``leaks_fixed``/``corruptions_fixed`` the repair's, ``messages`` both
    passes'.  A format without a check raises :class:`UnsupportedError`.
    """
    from .engines.check import check as engine
    return engine(path, fmt=fmt, repair=repair, force_share=force_share)


def compact(path: str | os.PathLike, *, fmt: str | None = None, dry_run: bool = False,
            progress: Callable[[float], Any] | None = None):
    """Compact a dynamic or differencing VHDX image offline (``blockdrv
    compact``, Hyper-V's Optimize-VHD): blocks of zeros become ZERO blocks,
    blocks at the end of the file move into holes, the file is truncated.
    Guest data and the DataWriteGuid never change; each move is crash-safe.
    ``dry_run`` opens read-only and only measures.  Returns a report with
    ``length_before``, ``length_after``, ``freed``, ``zeroed_blocks``,
    ``moved_blocks``.  Fixed images, images in use (locked), read-only files
    are refused with a :class:`BlockDriverError`; a pending log is replayed
    first."""
    from .engines.compact import compact as engine
    return engine(path, fmt=fmt, dry_run=dry_run, progress=progress)


def commit(path: str | os.PathLike, *, fmt: str | None = None,
           base: str | os.PathLike | None = None, drop: bool = False,
           cache: str = "writeback",
           progress: Callable[[float], Any] | None = None):
    """Write ``path``'s data into its backing file, or into ``base`` further
    down the chain, then empty ``path`` unless ``drop`` (``qemu-img
    commit``; ``base`` implies ``drop``).  Crash-safe: the base is written
    and flushed before the image is emptied.  Returns a
    :class:`blockdrv.engines.commit.CommitResult`."""
    from .engines.commit import commit as engine
    return engine(os.fspath(path), fmt=fmt, base=None if base is None else os.fspath(base),
                  drop=drop, cache=cache, progress=progress)


def rebase(path: str | os.PathLike, backing: str | os.PathLike, *, fmt: str | None = None,
           backing_fmt: str | None = None, unsafe: bool = False,
           ignore_id_mismatch: bool = False, cache: str = "writeback",
           src_cache: str = "writeback",
           progress: Callable[[float], Any] | None = None) -> int:
    """Give ``path`` the backing file ``backing`` (``qemu-img rebase``): by
    default copying in whatever the old and new chains read differently so
    the content does not change; ``unsafe`` only rewrites the recorded
    parent (a VHDX parent must match the linkage unless
    ``ignore_id_mismatch``).  Returns the bytes copied."""
    from .engines.rebase import rebase as engine
    return engine(os.fspath(path), os.fspath(backing), fmt=fmt, backing_fmt=backing_fmt,
                  unsafe=unsafe, ignore_id_mismatch=ignore_id_mismatch, cache=cache,
                  src_cache=src_cache, progress=progress)


def measure(fmt: str, source: str | os.PathLike | None = None, *, size: int | str | None = None,
            src_fmt: str | None = None, options: dict[str, Any] | None = None
            ) -> dict[str, int]:
    """``{"required": N, "fully-allocated": M}``: the file size a new ``fmt``
    image needs for a copy of ``source`` or an empty disk of ``size``
    (``qemu-img measure``)."""
    from .engines.measure import measure as engine
    return engine(fmt, filename=None if source is None else os.fspath(source), fmt=src_fmt,
                  size=None if size is None else parse_size(size), options=options)
