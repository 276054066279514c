"""``create -f vhdx -b PARENT -F vhdx CHILD [size]``: a differencing image.

The parent is opened read-only (relative names are taken against the
child's directory, as qemu-img does for backing files) to read what the
child inherits: its size (when none is given), block size, sector sizes and
the DataWriteGuid the parent locator links to.  The spec requires equal
logical sector sizes; the block size may differ (spec 2.6.2.1 sets no rule
between parent and child) and defaults to the parent's.  A differencing
image is dynamic and starts with every block NOT_PRESENT (a ZERO block would
hide the parent's data).
"""

from __future__ import annotations

import os

from blockdrv.errors import BlockDriverError, InvalidArgumentError

from . import parent as vparent


def child_options(filename: str, backing: str, backing_fmt: str | None, size: int | None,
                  kwargs: dict):
    """(parent node, create_vhdx keyword arguments, size); the caller closes
    the parent once the child is written."""
    if backing_fmt not in (None, "vhdx"):
        raise InvalidArgumentError(
            f"Backing file format '{backing_fmt}' is not supported for a VHDX "
            "differencing image (the parent must be vhdx)")
    from blockdrv.block import open_node
    path = vparent.path_combine(filename, backing)
    from blockdrv.block import split_protocol
    proto, rest = split_protocol(filename)
    if proto == "file" and os.path.exists(rest) and os.path.exists(path) \
            and os.path.samefile(rest, path):
        raise InvalidArgumentError("Error: Trying to create an image with the same "
                                   "filename as the backing file")
    try:
        parent = open_node(path, backing_fmt, 0)
    except BlockDriverError as exc:
        raise type(exc)(f"Could not open backing file '{path}': {exc.message}",
                        errno=exc.errno) from None
    try:
        if parent.format_name != "vhdx":
            raise InvalidArgumentError(
                f"Backing file '{path}' is {parent.format_name}; a VHDX differencing "
                "image needs a vhdx parent")
        pimg = parent.opaque
        if pimg.overlay is not None:
            raise InvalidArgumentError(
                f"Backing file '{path}' has a pending log; open it read-write once to "
                "replay it (that changes its DataWriteGuid) before making children")
        out = dict(kwargs)
        if out.get("subformat") not in (None, "dynamic"):
            raise InvalidArgumentError("A VHDX differencing image cannot be fixed")
        if out.get("block_state_zero"):
            raise InvalidArgumentError("block_state_zero=on would hide the parent's data "
                                       "in a differencing image")
        out["block_state_zero"] = False
        if not out.get("block_size"):
            out["block_size"] = pimg.block_size
        lss = out.get("logical_sector_size") or pimg.logical_sector_size
        if lss != pimg.logical_sector_size:
            raise InvalidArgumentError(
                f"Logical sector size {lss} differs from the parent's "
                f"({pimg.logical_sector_size}); a VHDX child must use the parent's")
        out["logical_sector_size"] = lss
        if out.get("physical_sector_size") is None:
            out["physical_sector_size"] = pimg.params.physical_sector_size
        if size is None:
            size = parent.total_size
        out["parent_locator"] = vparent.build_locator(
            rest if proto == "file" else filename, path, pimg.header.data_write_guid)
        return parent, out, size
    except BaseException:
        parent.close()
        raise
