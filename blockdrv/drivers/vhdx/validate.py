"""What an image may not be opened with: BAT entries whose blocks overlap the
header, log or a region, or lie beyond the end of the file (qemu refuses
those too: reads would return metadata, or zeros for data the BAT says is
there), and sector bitmap entries pointing into metadata or past the end.
"""

from __future__ import annotations

from blockdrv.errors import CorruptImageError


def refuse_at_open(layout, file_length: int) -> None:
    """Raise on the first finding that makes the image unsafe to open."""
    bat = layout.bat
    if bat.differencing:
        from .bitmap import bitmap_problems
        problems = bitmap_problems(layout, file_length, partial=False)
        if problems:
            raise CorruptImageError(problems[0])
    # Only what open refuses, chunked, numpy-free on a typical table.
    in_meta, beyond = bat.open_check(file_length, layout.regions)
    if in_meta is not None:
        raise CorruptImageError(
            f"VHDX BAT entry for block {in_meta} points into VHDX metadata")
    if beyond is not None:
        raise CorruptImageError(
            f"VHDX BAT entry for block {beyond} points after the end of the file "
            "(the image has probably been truncated)")


__all__ = ["refuse_at_open"]
