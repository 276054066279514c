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

import sys

from .errors import (BlockDriverError, BlockIOError, CorruptImageError,
                     InvalidArgumentError, PermissionConflictError, ReadOnlyError,
                     UnsupportedError)
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Image", "open", "ImageIO", "open_image", "create_image", "hookimpl", "ProbedRawWarning",
    "convert", "compare", "check", "compact", "commit", "rebase", "measure",
    "CompareResult", "CheckResult",
    "BlockDriverError", "BlockIOError", "CorruptImageError",
    "InvalidArgumentError", "PermissionConflictError", "ReadOnlyError", "UnsupportedError",
]


# The Python API's names, from their modules on first use: the blockdrv
# command (which imports this package) needs neither api.py nor fileobj.py,
# and CompareResult comes with its engine.
_LAZY = {**dict.fromkeys(("CheckResult", "Image", "ProbedRawWarning", "check", "commit",
                          "compact", "compare", "convert", "create_image", "measure",
                          "open_image", "rebase", "api"), "api"),
         **dict.fromkeys(("ImageIO", "open", "fileobj"), "fileobj"),
         "CompareResult": "engines.compare"}


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'blockdrv' has no attribute '{name}'")
    __import__(f"{__name__}.{where}")
    module = sys.modules[f"{__name__}.{where}"]
    value = module if name == where else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
