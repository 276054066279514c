"""What ``check`` finds in the BAT and the region tables (counted as qemu 7.2
counts, plus what only we detect), and the messages describing it."""

from __future__ import annotations

from blockdrv._startup import dataclass, field

from blockdrv.errors import CorruptImageError

from ..constants import (BAT_OFFSET_MASK, PAYLOAD_BLOCK_FULLY_PRESENT, REGION_TABLE_OFFSETS,
                         REGION_TABLE_SIZE)
from ..image import VHDXImage
from ..region import RegionTable
from ..validate import Findings
from .entries import findings, is_few

_INT64_MAX = (1 << 63) - 1
_MAX_MESSAGES = 200


@dataclass
class _Findings:
    """The validator's findings (:class:`..validate.Findings`: ``idx``, BAT
    indices, and boolean arrays parallel to it), the corruptions counted per
    entry, bad region table copies and the messages."""

    found: Findings
    count: object                           # corruptions per entry of idx (list or array)
    region_copies_bad: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __getattr__(self, name):            # the masks and geometry of .found
        if name == "found":
            raise AttributeError(name)
        return getattr(self.found, name)

    @property
    def corruptions(self) -> int:
        return int(sum(self.count)) + len(self.region_copies_bad)

    def bad(self) -> list[int]:
        """Positions (in ``idx``) of the entries with a corruption."""
        if is_few(self.found):
            return [k for k, c in enumerate(self.count) if c]
        import numpy as np
        return np.flatnonzero(self.count).tolist()


def _analyse(img: VHDXImage, limit: int | None = None) -> _Findings:
    """The findings of ``img``, counted: in pure Python when few entries are
    worth a look (:mod:`.entries`), with numpy otherwise."""
    flen = img.file_length()
    f = findings(img, flen, limit)
    if is_few(f):
        out, q_len, overflow = _count_few(img, f, flen)
    else:
        out, q_len, overflow = _count_np(img, f, flen)
    out.region_copies_bad = _bad_region_copies(img)
    _describe(img, out, f.start, f.state, flen, q_len, overflow)
    return out


def _count_few(img: VHDXImage, f: Findings, flen: int):
    """:func:`_count_np` entry by entry."""
    bsize, vsize = img.block_size, img.virtual_size
    ratio = img.bat.chunk_ratio
    spans = img.structure_spans()[1:]
    diff = img.bat.differencing
    count, q_lens, overflows = [], [], []
    rank = 0                        # FULLY_PRESENT entries so far
    for k, i in enumerate(f.idx):
        off = f.start[k]
        fp = f.state[k] == PAYLOAD_BLOCK_FULLY_PRESENT and not (diff and f.is_bitmap[k])
        q_rest = vsize - i * bsize
        q_len = min(q_rest, bsize) if q_rest > 0 else bsize
        overflow = past_eof = q_cut = q_region = False
        if fp:
            raw_off = img.bat.raw_at(i) & BAT_OFFSET_MASK
            overflow = raw_off > _INT64_MAX - bsize
            past_eof = off >= flen
            q_cut = not past_eof and off + q_len > flen
            if rank % (ratio + 1) != ratio:
                q_region = any(off < e and off + bsize > s for s, e in spans)
            rank += 1
        ours = (f.past_eof[k] or f.cut_short[k] or f.in_metadata[k] or f.partial[k]
                or f.bad_state[k] or f.reserved[k] or f.stray_bitmap[k] or f.overlapping[k])
        count.append(max(overflow + past_eof + q_cut + q_region, int(ours)))
        q_lens.append(q_len)
        overflows.append(overflow)
    return _Findings(f, count), q_lens, overflows


def _count_np(img: VHDXImage, f: Findings, flen: int):
    """qemu's counts, and ours, for the whole of ``f`` at once."""
    import numpy as np
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
    return _Findings(f, count), q_len, overflow


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
    bad = f.bad()
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
