"""Simulating a crash of the process that has an image open."""

from __future__ import annotations


def abandon(bs) -> None:
    """Drop the node graph under ``bs`` as a dying process would: no driver
    flushes or finishes anything, but the operating system closes the
    descriptors -- and so releases the image's locks -- as it does at exit."""
    todo = [bs]
    while todo:
        node = todo.pop()
        if node is None or node.closed:
            continue
        todo += [node.file, node.backing]
        if node.file is None and node.drv.protocol_name and node.drv.bdrv_close is not None:
            node.drv.bdrv_close(node)         # leaf protocols: just their descriptors
        node.opaque = None
        node.closed = True
