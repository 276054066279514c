"""What ``check`` finds in the BAT and the region tables (counted as qemu 7.2
counts, plus what only we detect), and the messages describing it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blockdrv.errors import CorruptImageError

from ..constants import (BAT_OFFSET_MASK, PAYLOAD_BLOCK_FULLY_PRESENT, REGION_TABLE_OFFSETS,
                         REGION_TABLE_SIZE)
from ..image import VHDXImage
from ..region import RegionTable
from ..validate import Findings, scan_layout

_INT64_MAX = (1 << 63) - 1
_MAX_MESSAGES = 200


@dataclass
class _Findings:
    """The validator's findings (:class:`..validate.Findings`: ``idx``, BAT
    indices, and boolean arrays parallel to it), the corruptions counted per
    entry, bad region table copies and the messages."""

    found: Findings
    count: np.ndarray                       # corruptions per entry of idx
    region_copies_bad: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __getattr__(self, name):            # the masks and geometry of .found
        if name == "found":
            raise AttributeError(name)
        return getattr(self.found, name)

    @property
    def corruptions(self) -> int:
        return int(self.count.sum()) + len(self.region_copies_bad)


def _analyse(img: VHDXImage) -> _Findings:
    flen = img.file_length()
    f = scan_layout(img.layout, flen)
    bsize = img.block_size
    ratio = img.bat.chunk_ratio
    state, idx = f.state, f.idx
    off = f.start
    off_u = img.bat.entries[idx] & np.uint64(BAT_OFFSET_MASK)
    # SB_BLOCK_PRESENT has FULLY_PRESENT's value; in a differencing image
    # sector bitmap blocks are checked by ..validate.bitmap_problems
    fp = state == PAYLOAD_BLOCK_FULLY_PRESENT
    if img.bat.differencing:
        fp &= ~f.is_bitmap

    # --- what qemu 7.2 counts (vhdx_check_bat_entries), entry by entry -------
    overflow = fp & (off_u > np.uint64(_INT64_MAX - bsize))
    past_eof = fp & (off >= flen)
    # qemu sizes the block by its BAT index (not its block number) and lets the
    # last one be short; an index past the disk end gets a full block.
    q_rest = img.virtual_size - idx * bsize
    q_len = np.where(q_rest > 0, np.minimum(q_rest, bsize), bsize)
    q_cut = fp & ~past_eof & (off + q_len > flen)
    # qemu's region check runs for all FULLY_PRESENT entries but every
    # (ratio+1)-th of them (its payload counter ignores the entry positions).
    # Every FULLY_PRESENT entry is among ours, so ranks are the same.
    q_region_checked = np.zeros(len(idx), bool)
    fp_pos = np.flatnonzero(fp)
    q_region_checked[fp_pos] = (np.arange(len(fp_pos)) % (ratio + 1)) != ratio
    end_full = off + bsize
    q_region = np.zeros(len(idx), bool)
    for s, e in img.structure_spans()[1:]:
        q_region |= (off < e) & (end_full > s)
    q_region &= q_region_checked & fp
    qemu_count = (overflow.astype(np.int64) + past_eof + q_cut + q_region)

    # --- what the validator finds, one count per entry with a problem ---------
    ours = (f.past_eof | f.cut_short | f.in_metadata | f.partial | f.bad_state | f.reserved
            | f.stray_bitmap | f.overlapping)
    count = np.maximum(qemu_count, ours.astype(np.int64))
    out = _Findings(f, count)
    out.region_copies_bad = _bad_region_copies(img)
    _describe(img, out, off, state, flen, q_len, overflow)
    return out


def _bad_region_copies(img: VHDXImage) -> list[int]:
    """Indices (0, 1) of region table copies that are invalid or disagree."""
    tables = []
    for at in REGION_TABLE_OFFSETS:
        try:
            tables.append(RegionTable.parse(img.read(at, REGION_TABLE_SIZE)))
        except CorruptImageError:
            tables.append(None)
    good = img.region_table
    return [i for i, t in enumerate(tables) if t is None or t.entries != good.entries]


def _describe(img, f: _Findings, off, state, flen, q_len, overflow) -> None:
    msgs = f.messages
    for i in f.region_copies_bad:
        msgs.append(f"VHDX region table copy {i + 1} is invalid or differs from the other")
    bad = np.flatnonzero(f.count)
    for i in bad[:_MAX_MESSAGES]:
        n = int(f.idx[i])        # the BAT index qemu prints
        o = int(off[i])
        if overflow[i]:
            msgs.append(f"VHDX BAT entry {n} offset overflow.")
        if f.past_eof[i] and state[i] == PAYLOAD_BLOCK_FULLY_PRESENT:
            msgs.append(f"VHDX BAT entry {n} start offset {o} points after end of file "
                        f"({flen}). Image has probably been truncated.")
        elif f.cut_short[i]:
            msgs.append(f"VHDX BAT entry {n} end offset {o + int(q_len[i]) - 1} points after "
                        f"end of file ({flen}). Image has probably been truncated.")
        if f.in_metadata[i]:
            msgs.append(f"VHDX BAT entry {n} (offset {o}) points into the header, log, "
                        "BAT or metadata")
        for name, text in (("overlapping", "overlaps an earlier payload block"),
                           ("partial", "is PARTIALLY_PRESENT in an image without a parent"),
                           ("bad_state", f"has an invalid state {int(state[i])}"),
                           ("reserved", "has reserved bits set"),
                           ("stray_bitmap", "is a sector bitmap entry in use in an image "
                                            "without a parent")):
            if getattr(f, name)[i]:
                msgs.append(f"VHDX BAT entry {n} {text}")
    if len(bad) > _MAX_MESSAGES:
        msgs.append(f"... and {len(bad) - _MAX_MESSAGES} more bad BAT entries")
