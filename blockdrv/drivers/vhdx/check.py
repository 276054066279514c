"""``check`` for VHDX: what qemu-img finds, plus the spec violations it misses."""

from __future__ import annotations

from blockdrv.node import CheckResult

from .image import VHDXImage


def check_image(bs, img: VHDXImage, fix: int) -> CheckResult:
    result = CheckResult()
    if img.log_replayed_on_open:
        # qemu counts a log replayed by a read-write open as a fixed corruption.
        result.corruptions_fixed += 1
    if img.overlay is not None:
        result.corruptions += 1
        result.messages.append("VHDX log needs to be replayed (open read-write or "
                               "use -r all)")
    length = img.overlay.length if img.overlay else img.file.getlength()
    found = img.bat.check(length, img.regions)
    for block in found.beyond_eof:
        result.messages.append(
            f"VHDX BAT entry {int(block)} offset points after end of file. "
            "Image has probably been truncated.")
    for name, label in (("unknown_state", "has an invalid state"),
                        ("partially_present", "is PARTIALLY_PRESENT without a parent"),
                        ("in_header", "points into the header section"),
                        ("in_regions", "points into the log, BAT or metadata"),
                        ("overlapping", "overlaps another block"),
                        ("reserved_bits", "has reserved bits set"),
                        ("bad_bitmap_state", "is an invalid sector bitmap entry")):
        for item in getattr(found, name):
            result.messages.append(f"VHDX BAT entry {int(item)} {label}")
    result.corruptions += found.corruptions
    return result
