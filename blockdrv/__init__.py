"""blockdrv: QEMU's block layer in Python, with a VHDX driver.

Public API::

    import blockdrv
    img = blockdrv.create_image("disk.vhdx", "vhdx", "1G")
    img.write(0, b"data"); img.flush(); img.close()
    with blockdrv.open_image("disk.vhdx") as img:
        img.read(0, 4)
    with blockdrv.open("disk.vhdx", "rb") as f:                # a file object, as gzip.open
        tarfile.open(fileobj=f).getnames()
    blockdrv.convert("disk.vhdx", "disk.raw", fmt="raw")      # qemu-img convert
    blockdrv.compare("disk.vhdx", "disk.raw").identical        # qemu-img compare
    blockdrv.check("disk.vhdx", repair="leaks").leaks_fixed    # qemu-img check
"""

from .api import (CheckResult, Image, ProbedRawWarning, check, commit, compact, compare,
                  convert, create_image, measure, open_image, rebase)
from .errors import (BlockDriverError, BlockIOError, CorruptImageError,
                     InvalidArgumentError, PermissionConflictError, ReadOnlyError,
                     UnsupportedError)
from .fileobj import ImageIO, open
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Image", "open", "ImageIO", "open_image", "create_image", "hookimpl", "ProbedRawWarning",
    "convert", "compare", "check", "compact", "commit", "rebase", "measure",
    "CompareResult", "CheckResult",
    "BlockDriverError", "BlockIOError", "CorruptImageError",
    "InvalidArgumentError", "PermissionConflictError", "ReadOnlyError", "UnsupportedError",
]


def __getattr__(name: str):
    # CompareResult comes with its engine, imported on first use (the
    # commands that never compare do not pay for it at start-up)
    if name == "CompareResult":
        from .engines.compare import CompareResult
        return CompareResult
    raise AttributeError(f"module 'blockdrv' has no attribute '{name}'")
