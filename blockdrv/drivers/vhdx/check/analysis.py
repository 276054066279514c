"""What ``check`` finds in the BAT and the region tables (counted as qemu 7.2
counts, plus what only we detect), and the messages describing it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blockdrv.errors import CorruptImageError

from ..constants import (HEADER_SECTION_SIZE, MiB, PAYLOAD_BLOCK_FULLY_PRESENT,
                         PAYLOAD_BLOCK_PARTIALLY_PRESENT, REGION_TABLE_OFFSETS,
                         REGION_TABLE_SIZE)
from ..image import VHDXImage
from ..region import RegionTable
from .entries import (_INT64_MAX, _OFF_MASK, _RESERVED_MASK, _bat_geometry, _block_lengths,
                      _offsets, _states)

_VALID_STATES = (0, 1, 2, 3, 5, 6, 7)
_MAX_MESSAGES = 200


@dataclass
class _Findings:
    """Problems of the BAT entries worth a look (``idx``, BAT indices), as
    boolean arrays parallel to ``idx``, and corruption counts per entry."""

    idx: np.ndarray
    count: np.ndarray                       # corruptions per entry of idx
    overflow: np.ndarray
    past_eof: np.ndarray                    # start at or past EOF
    cut_short: np.ndarray                   # starts inside the file, ends past it
    in_metadata: np.ndarray                 # header section, log or a region
    overlapping: np.ndarray                 # payload overlapping an earlier block
    partial: np.ndarray
    bad_state: np.ndarray
    reserved: np.ndarray
    stray_bitmap: np.ndarray
    region_copies_bad: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def corruptions(self) -> int:
        return int(self.count.sum()) + len(self.region_copies_bad)


def _analyse(img: VHDXImage) -> _Findings:
    flen = img.file_length()
    # the log and the regions: structure_spans without the header section
    regions = img.structure_spans()[1:]
    bsize = img.block_size
    entries, idx, is_bitmap, block, ratio = _bat_geometry(img)
    state = _states(entries)
    off_u = entries & _OFF_MASK
    fp = state == PAYLOAD_BLOCK_FULLY_PRESENT
    payload = ~is_bitmap
    if img.bat.differencing:
        # SB_BLOCK_PRESENT has FULLY_PRESENT's value; sector bitmap blocks
        # (1 MiB each) are checked by .bitmap.bitmap_problems
        fp &= payload

    # --- what qemu 7.2 counts (vhdx_check_bat_entries), entry by entry -------
    overflow = fp & (off_u > np.uint64(_INT64_MAX - bsize))
    off = _offsets(entries)
    past_eof = fp & (off >= flen)
    # qemu sizes the block by its BAT index (not its block number) and lets the
    # last one be short; an index past the disk end gets a full block.
    q_rest = img.virtual_size - idx * bsize
    q_len = np.where(q_rest > 0, np.minimum(q_rest, bsize), bsize)
    q_cut = fp & ~past_eof & (off + q_len > flen)
    # qemu's region check runs for all FULLY_PRESENT entries but every
    # (ratio+1)-th of them (its payload counter ignores the entry positions).
    # Every FULLY_PRESENT entry is among ours, so ranks are the same.
    q_region_checked = np.zeros(len(entries), bool)
    fp_pos = np.flatnonzero(fp)
    q_region_checked[fp_pos] = (np.arange(len(fp_pos)) % (ratio + 1)) != ratio
    end_full = off + bsize
    q_region = np.zeros(len(entries), bool)
    for s, e in regions:
        q_region |= (off < e) & (end_full > s)
    q_region &= q_region_checked & fp
    qemu_count = (overflow.astype(np.int64) + past_eof + q_cut + q_region)

    # --- what we check (payload entries by their true length) --------------------
    present = payload & (fp | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    true_len = np.where(payload, _block_lengths(img, block), MiB)
    cut_short = present & ~past_eof & ~overflow & (off + true_len > flen)
    past_eof_ours = present & (overflow | (off >= flen))
    in_meta = present & (off < HEADER_SECTION_SIZE)
    for s, e in regions:
        in_meta |= present & (off < e) & (off + bsize > s)
    partial = payload & (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT) & (not img.bat.differencing)
    bad_state = ~np.isin(state, _VALID_STATES) & payload
    reserved = (entries & _RESERVED_MASK) != 0
    stray_bitmap = is_bitmap & (state != 0) & (not img.bat.differencing)
    overlapping = _overlaps(present & ~in_meta & ~past_eof_ours, off, true_len)

    ours = (past_eof_ours | cut_short | in_meta | partial | bad_state | reserved
            | stray_bitmap | overlapping)
    count = np.maximum(qemu_count, ours.astype(np.int64))

    f = _Findings(idx, count, overflow, past_eof_ours, cut_short, in_meta, overlapping, partial,
                  bad_state, reserved, stray_bitmap)
    f.region_copies_bad = _bad_region_copies(img)
    _describe(img, f, off, state, flen, q_len)
    return f


def _overlaps(mask: np.ndarray, off: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Entries whose extent overlaps an earlier-starting one; for equal starts
    the lower BAT index (entries are in BAT order) is kept."""
    out = np.zeros(len(mask), bool)
    ids = np.flatnonzero(mask)
    if len(ids) < 2:
        return out
    starts = off[ids]
    ends = starts + length[ids]
    order = np.lexsort((ids, starts))
    s, e = starts[order], ends[order]
    prev_end = np.maximum.accumulate(e)
    hit = np.zeros(len(ids), bool)
    hit[1:] = s[1:] < prev_end[:-1]
    out[ids[order][hit]] = True
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


def _describe(img, f: _Findings, off, state, flen, q_len) -> None:
    msgs = f.messages
    for i in f.region_copies_bad:
        msgs.append(f"VHDX region table copy {i + 1} is invalid or differs from the other")
    bad = np.flatnonzero(f.count)
    for i in bad[:_MAX_MESSAGES]:
        n = int(f.idx[i])        # the BAT index qemu prints
        o = int(off[i])
        if f.overflow[i]:
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
