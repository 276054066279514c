"""``check`` for VHDX: what qemu-img 7.2 finds, the spec violations it misses,
and crash-safe repairs.

Counting (``CheckResult``, qemu's semantics: ``corruptions``/``leaks`` are
what remains after any repair, ``*_fixed`` what was repaired):

* a log replayed by the read-write open counts one fixed corruption (qemu);
  a read-only check of an image with a pending log counts one corruption;
* per BAT entry, qemu's count where qemu finds something -- it counts, for a
  FULLY_PRESENT entry, one for an offset that overflows, one for a start or
  end past the end of file, one for an overlap with the log or a region --
  and otherwise one for each entry with a problem only we detect: payload in
  the header section, overlapping (duplicate) payload blocks,
  PARTIALLY_PRESENT without a parent, an undefined state, reserved bits set,
  a sector bitmap entry in use in an image without a parent;
* the two region table copies must both be valid and agree;
* leaks: 1 MiB units of the file, at or after the first payload offset,
  that nothing references (the header section, log, regions, payload and
  sector bitmap blocks; the space a fixed image preallocates).  The first
  payload offset is the lowest payload block or, at the latest, 4 MiB after
  the last region -- where qemu and blockdrv put the first block.

Repairs (need a read-write open; every BAT change goes through the log, one
entry per run of at most 64 BAT sectors, so a power cut during repair
replays or drops whole updates):

* ``FIX_ERRORS``: an entry pointing into the header/log/BAT/metadata, wholly
  past the end of file, or with an undefined state becomes NOT_PRESENT (none
  of these was readable: open refuses them or the read fails); a block cut
  short by truncation gets the file extended to its end (its surviving bytes
  stay); a block overlapping an earlier one gets a copy of the shared data in
  a new block (both guest blocks read what they read before); reserved bits
  are cleared; stray sector bitmap entries are cleared; a bad region table
  copy is rewritten from the good one.  PARTIALLY_PRESENT blocks are left
  alone: which sectors are valid is known only to a parent we do not have.
* ``FIX_LEAKS``: unreferenced space at the end of the file is truncated
  (nothing is moved; leaks between used blocks stay counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blockdrv.errors import BlockDriverError, CorruptImageError
from blockdrv.node import FIX_ERRORS, FIX_LEAKS, CheckResult

from .constants import (HEADER_SECTION_SIZE, MiB, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                        REGION_TABLE_OFFSETS, REGION_TABLE_SIZE)
from .image import VHDXImage
from .region import RegionTable

_OFF_MASK = np.uint64(~(MiB - 1) & ((1 << 64) - 1))
_STATE_MASK = np.uint64(7)
_RESERVED_MASK = np.uint64((MiB - 1) & ~7)
_VALID_STATES = (0, 1, 2, 3, 5, 6, 7)
_INT64_MAX = (1 << 63) - 1
# qemu and blockdrv leave 4 MiB between the metadata region and the first block.
_QEMU_DATA_GAP = 4 * MiB
_MAX_MESSAGES = 200
_SECTORS_PER_LOG_ENTRY = 64
_COPY_CHUNK = 1 * MiB


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


@dataclass
class _Leaks:
    units: int                  # leaked 1 MiB units
    trailing: int               # of which at the end of file (reclaimable)
    keep_length: int            # truncating to this reclaims the trailing ones


def check_image(bs, img: VHDXImage, fix: int) -> CheckResult:
    result = CheckResult()
    if img.log_replayed_on_open:
        # qemu counts a log replayed by a read-write open as a fixed corruption.
        result.corruptions_fixed += 1
        result.messages.append("VHDX log replayed on open")
    if img.overlay is not None:
        result.corruptions += 1
        result.messages.append("VHDX log needs to be replayed (open read-write or use -r all)")
    for message in getattr(img, "region_overlaps", ()):
        result.corruptions += 1
        result.messages.append(message)
    writable = not img.read_only and img.overlay is None
    try:
        found = _analyse(img)
        if fix & FIX_ERRORS and writable and found.corruptions:
            _repair(img, found)
            after = _analyse(img)
            result.corruptions_fixed += max(found.corruptions - after.corruptions, 0)
            remaining = set(after.messages)
            result.messages += [f"Repaired: {m}" for m in found.messages if m not in remaining]
            found = after
        result.corruptions += found.corruptions
        result.messages += found.messages
        leaks = _leaks(img)
        if fix & FIX_LEAKS and writable and leaks.trailing:
            img.file.truncate(leaks.keep_length)
            img.file.flush()
            after = _leaks(img)
            result.leaks_fixed += max(leaks.units - after.units, 0)
            result.messages.append(f"Reclaimed {leaks.units - after.units} MiB of unreferenced "
                                   "space at the end of the file")
            leaks = after
        result.leaks += leaks.units
        if leaks.units:
            result.messages.append(f"{leaks.units} MiB of the file are referenced by no BAT entry"
                                   f" ({leaks.trailing} MiB at the end of the file)")
    except BlockDriverError as exc:
        result.check_errors += 1
        result.messages.append(f"Check failed: {exc}")
    return result


# --------------------------------------------------------------------------- analysis

def _file_length(img: VHDXImage) -> int:
    return img.overlay.length if img.overlay is not None else img.file.getlength()


def _bat_geometry(img: VHDXImage):
    """The entries that can have a problem, with their BAT index, kind and block.

    A payload entry 0..3 (absent, offset zero, no reserved bit) and a zero
    sector bitmap entry are always fine; a large sparse disk is almost only
    those, so everything else works on the few remaining entries.
    """
    all_entries = img.bat.entries
    ratio = img.bat.chunk_ratio
    idx = np.flatnonzero(all_entries > np.uint64(3))
    bitmap_idx = np.arange(ratio, len(all_entries), ratio + 1, dtype=np.int64)
    stray = bitmap_idx[all_entries[bitmap_idx] != 0]
    if len(stray):
        idx = np.union1d(idx, stray)
    idx = idx.astype(np.int64)
    entries = all_entries[idx]
    is_bitmap = (idx % (ratio + 1)) == ratio
    block = idx - idx // (ratio + 1)
    return entries, idx, is_bitmap, block, ratio


def _block_lengths(img: VHDXImage, block: np.ndarray) -> np.ndarray:
    """Bytes of each payload block inside the virtual disk (the last may be short)."""
    rest = img.virtual_size - block * img.block_size
    return np.clip(rest, 0, img.block_size)


def _metadata_spans(img: VHDXImage) -> list[tuple[int, int]]:
    return [(s, s + n) for s, n in img.regions if n]


def _analyse(img: VHDXImage) -> _Findings:
    flen = _file_length(img)
    bsize = img.block_size
    entries, idx, is_bitmap, block, ratio = _bat_geometry(img)
    state = (entries & _STATE_MASK).astype(np.uint8)
    off_u = entries & _OFF_MASK
    fp = state == PAYLOAD_BLOCK_FULLY_PRESENT
    payload = ~is_bitmap

    # --- what qemu 7.2 counts (vhdx_check_bat_entries), entry by entry -------
    overflow = fp & (off_u > np.uint64(_INT64_MAX - bsize))
    off = np.minimum(off_u, np.uint64(_INT64_MAX)).astype(np.int64)
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
    for s, e in _metadata_spans(img):
        q_region |= (off < e) & (end_full > s)
    q_region &= q_region_checked & fp
    qemu_count = (overflow.astype(np.int64) + past_eof + q_cut + q_region)

    # --- what we check (payload entries by their true length) --------------------
    present = payload & (fp | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    true_len = np.where(payload, _block_lengths(img, block), MiB)
    cut_short = present & ~past_eof & ~overflow & (off + true_len > flen)
    past_eof_ours = present & (overflow | (off >= flen))
    in_meta = present & (off < HEADER_SECTION_SIZE)
    for s, e in _metadata_spans(img):
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
            tables.append(RegionTable.parse(img._read(at, REGION_TABLE_SIZE)))
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


def _leaks(img: VHDXImage) -> _Leaks:
    flen = _file_length(img)
    eof_units = -(-flen // MiB)
    entries, idx, is_bitmap, block, _ = _bat_geometry(img)
    state = (entries & _STATE_MASK).astype(np.uint8)
    off = np.minimum(entries & _OFF_MASK, np.uint64(_INT64_MAX)).astype(np.int64)
    present = (state == PAYLOAD_BLOCK_FULLY_PRESENT) | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    lengths = np.where(is_bitmap, MiB, img.block_size)
    starts, ends = off[present], off[present] + lengths[present]
    inside = starts < flen
    starts, ends = starts[inside], ends[inside]

    spans = [(0, HEADER_SECTION_SIZE)] + _metadata_spans(img)
    struct_end = -(-max(e for _, e in spans) // MiB) * MiB
    payload_start = struct_end + _QEMU_DATA_GAP
    above = starts[(starts >= struct_end) & ~is_bitmap[present][inside]]
    if len(above):
        payload_start = min(payload_start, int(above.min()) // MiB * MiB)
    extra = list(spans)
    if img.fixed:
        # a fixed image may preallocate its payload in one piece (qemu does,
        # with block_state_zero=on, leaving the blocks ZERO)
        extra.append((struct_end + _QEMU_DATA_GAP,
                      struct_end + _QEMU_DATA_GAP + img.virtual_size))
    s_all = np.concatenate([starts, np.array([s for s, _ in extra], np.int64)])
    e_all = np.concatenate([ends, np.array([e for _, e in extra], np.int64)])
    # in 1 MiB units, clipped to [payload_start, EOF)
    lo_u = payload_start // MiB
    su = np.clip(s_all // MiB, lo_u, eof_units)
    eu = np.clip(-(-e_all // MiB), lo_u, eof_units)
    keep = eu > su
    su, eu = su[keep], eu[keep]
    covered, last = 0, lo_u
    if len(su):
        order = np.argsort(su, kind="stable")
        su, eu = su[order], eu[order]
        run_end = np.maximum.accumulate(eu)
        # a new run starts where the start is past every earlier end
        new_run = np.ones(len(su), bool)
        new_run[1:] = su[1:] >= run_end[:-1]
        run_ids = np.cumsum(new_run) - 1
        run_start = su[new_run]
        run_stop = np.zeros(len(run_start), np.int64)
        np.maximum.at(run_stop, run_ids, eu)
        covered = int((run_stop - run_start).sum())
        last = max(last, int(run_stop.max()))
    total = max(eof_units - lo_u, 0)
    units = total - covered
    trailing = max(eof_units - last, 0)
    keep_length = max(last * MiB, payload_start)
    return _Leaks(units, trailing if keep_length < flen else 0, keep_length)


# --------------------------------------------------------------------------- repair

def _repair(img: VHDXImage, f: _Findings) -> None:
    file = img.file
    entries, idx, is_bitmap, block, _ = _bat_geometry(img)
    assert np.array_equal(idx, f.idx)
    new = entries.copy()
    off = np.minimum(entries & _OFF_MASK, np.uint64(_INT64_MAX)).astype(np.int64)

    # 1. region table copies: rewrite a bad copy from the one open used
    if f.region_copies_bad:
        good = img.region_table.pack()
        for i in f.region_copies_bad:
            file.pwrite(REGION_TABLE_OFFSETS[i], good)
        file.flush()

    # 2. entries nothing could read: NOT_PRESENT
    drop = (f.past_eof | f.in_metadata | f.bad_state) & ~is_bitmap
    new[drop] = np.uint64(PAYLOAD_BLOCK_NOT_PRESENT)
    # 3. stray bitmap entries and reserved bits
    new[f.stray_bitmap] = np.uint64(0)
    keep_bits = ~f.stray_bitmap & ~drop & f.reserved
    new[keep_bits] &= ~_RESERVED_MASK

    # 4. blocks cut short by a truncation: extend the file over them
    cut = f.cut_short & ~drop
    if cut.any():
        lengths = _block_lengths(img, block)
        need = int((off[cut] + lengths[cut]).max())
        if need > file.getlength():
            file.truncate(need)
            file.flush()

    # 5. overlapping blocks: give each later one its own copy of the data
    for i in np.flatnonzero(f.overlapping & ~drop):
        i = int(i)
        length = int(_block_lengths(img, block[i:i + 1])[0])
        src = int(off[i])
        dst = -(-file.getlength() // MiB) * MiB
        file.truncate(dst + img.block_size)
        pos = 0
        while pos < length:
            n = min(_COPY_CHUNK, length - pos)
            file.pwrite(dst + pos, bytes(file.pread(src + pos, n)))
            pos += n
        file.flush()
        new[i] = np.uint64(dst) | (entries[i] & _STATE_MASK)

    _journal_bat(img, idx, new)


def _journal_bat(img: VHDXImage, idx: np.ndarray, values: np.ndarray) -> None:
    """Set BAT entries ``idx`` to ``values`` through the log, whole sectors at a
    time (at most 64 sectors per log entry); nothing the size of the BAT is copied."""
    old = img.bat.entries
    moved = values != old[idx]
    changed, values = idx[moved], values[moved]
    if not len(changed):
        return
    per_sector = 4096 // 8
    sectors = np.unique(changed // per_sector)
    runs: list[list[int]] = []
    for s in sectors.tolist():
        if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < _SECTORS_PER_LOG_ENTRY:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        first, last = run[0] * per_sector, min((run[-1] + 1) * per_sector, len(old))
        lo, hi = np.searchsorted(changed, [first, last])
        chunk = np.array(old[first:last])
        chunk[changed[lo:hi] - first] = values[lo:hi]
        img.log_writer.write_and_flush(img.file, img.bat_offset + first * 8,
                                       chunk.astype("<u8").tobytes(), img._set_log_guid)
        old[first:last] = chunk        # the in-memory BAT follows the disk
