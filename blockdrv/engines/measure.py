"""qemu-img measure's engine: the host size a new image needs.

``measure(fmt, filename=...)`` sizes a copy of an image (its guest view,
backing chain included) as ``convert -O fmt`` would write it;
``measure(fmt, size=N)`` an empty image of N bytes.  The numbers are the
output format's (its ``bdrv_measure`` hook): ``required`` is at least what
``convert`` writes, ``fully-allocated`` what the image takes with every
block allocated.
"""

from __future__ import annotations

from typing import Any

from ..common import O_FORCE_SHARE
from ..errors import InvalidArgumentError, UnsupportedError
from ..options import parse_create_options
from ..plugins import get_registry
from .common import open_source


def measure(output_fmt: str, *, filename: str | None = None, fmt: str | None = None,
            size: int | None = None, options: dict[str, Any] | None = None,
            force_share: bool = False) -> dict[str, int]:
    """``{"required": N, "fully-allocated": M}`` for a new ``output_fmt`` image."""
    if (filename is None) == (size is None):
        raise InvalidArgumentError("--size N cannot be used together with a filename."
                                   if filename is not None else
                                   "Either --size N or one filename must be specified.")
    drv = get_registry().format(output_fmt)
    if drv.bdrv_measure is None:
        raise UnsupportedError(f"Format driver '{output_fmt}' does not support "
                               "size measurement")
    parsed = parse_create_options(options or {}, drv.create_opts())
    parsed.pop("size", None)
    if filename is None:
        return dict(drv.bdrv_measure(parsed, None, size))
    bs = open_source(filename, fmt, O_FORCE_SHARE if force_share else 0)
    try:
        return dict(drv.bdrv_measure(parsed, bs, None))
    finally:
        bs.close()
