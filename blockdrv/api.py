"""The public Python API: images you can read and write without asyncio."""

from __future__ import annotations

import os
from typing import Any

from . import block
from .errors import InvalidArgumentError
from .common import O_FORCE_SHARE, O_RDWR, BlockStatus, CheckResult, DriverInfo
from .node import BlockDriverState
from .options import parse_size


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
    ``discard="ignore"`` drops discards.
    """
    flags = (0 if readonly else O_RDWR) | (O_FORCE_SHARE if force_share else 0)
    options.setdefault("discard", "unmap")
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
