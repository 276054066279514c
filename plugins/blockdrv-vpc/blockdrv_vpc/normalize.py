"""What differs between two identical qemu-img runs on a VHD: the footer's
timestamp, checksum and UUID, in the copy at offset 0 (dynamic images) and
in the one in the last 512 bytes.

:func:`normalize` takes a whole file, or its head and tail glued together
(anything whose first and last 512 bytes are the file's), and masks those
fields wherever a footer cookie starts a copy.  :func:`mask_ranges` says
which ranges of a file of a given length it masks, for a harness that masks
ranges itself.
"""

from __future__ import annotations

FOOTER_SIZE = 512
COOKIE = b"conectix"
# (offset in the footer, length): timestamp, checksum + UUID
FIELDS = ((24, 4), (64, 4 + 16))


def _footer_starts(data: bytes) -> list[int]:
    starts = []
    if data[:8] == COOKIE:
        starts.append(0)
    tail = len(data) - FOOTER_SIZE
    if tail > 0 and data[tail:tail + 8] == COOKIE:
        starts.append(tail)
    return starts


def mask_ranges(data: bytes) -> list[tuple[int, int]]:
    """``(start, length)`` of every masked field of ``data``."""
    return [(at + off, n) for at in _footer_starts(data) for off, n in FIELDS]


def normalize(data: bytes) -> bytes:
    """``data`` with the run-dependent footer fields zeroed."""
    out = bytearray(data)
    for start, n in mask_ranges(data):
        out[start:start + n] = bytes(n)
    return bytes(out)
