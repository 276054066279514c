"""Free space: bytes of the file that nothing references.

Spec 2.1 lets structures and free space intermix anywhere in the file, and
qemu-img never reports a VHDX leak, so ``check`` reports free space as
information only.  Counted from the first payload offset on (the space qemu
and blockdrv keep between the metadata region and the first block is layout,
not free space worth a word); ``-r leaks`` truncates what lies at the end.
"""

from __future__ import annotations

from blockdrv._startup import dataclass

from ..constants import (MiB, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                         round_up)
from ..image import VHDXImage
from .entries import findings, is_few

_PRESENT = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)

# qemu and blockdrv leave 4 MiB between the metadata region and the first block.
_QEMU_DATA_GAP = 4 * MiB


@dataclass
class _FreeSpace:
    total: int                  # bytes referenced by nothing
    trailing: int               # of which at the end of the file (reclaimable)
    keep_length: int            # truncating to this reclaims the trailing bytes


def _free_space(img: VHDXImage, f=None) -> _FreeSpace:
    """The free space of ``img``: in pure Python when few entries are worth a
    look (:mod:`.entries`), with numpy otherwise.  ``f``: its findings, when
    the caller has them for the file as it is."""
    flen = img.file_length()
    if f is None:
        f = findings(img, flen)
    spans = img.structure_spans()
    struct_end = round_up(max(e for _, e in spans), MiB)
    extra = list(spans)
    if img.fixed:
        # a fixed image may preallocate its payload in one piece (qemu does,
        # with block_state_zero=on, leaving the blocks ZERO)
        extra.append((struct_end + _QEMU_DATA_GAP,
                      struct_end + _QEMU_DATA_GAP + img.virtual_size))
    covered, last, lo = (_covered_few if is_few(f) else _covered_np)(img, f, flen, struct_end,
                                                                      extra)
    total = max(flen - lo, 0) - covered
    trailing = max(flen - last, 0)
    return _FreeSpace(total, trailing, last if trailing else flen)


def _covered_few(img, f, flen: int, struct_end: int, extra):
    """:func:`_covered_np` entry by entry."""
    lo = struct_end + _QEMU_DATA_GAP
    blocks = []                       # (start, end) of present blocks starting in the file
    for k, state in enumerate(f.state):
        start = f.start[k]
        if state not in _PRESENT or start >= flen:
            continue
        is_bitmap = f.is_bitmap[k]
        blocks.append((start, start + (MiB if is_bitmap else img.block_size)))
        if start >= struct_end and not is_bitmap:
            lo = min(lo, start // MiB * MiB)
    # clipped to [payload start, EOF), merged into runs
    hi = max(flen, lo)
    covered, last, run_start, run_end = 0, lo, None, None
    for s, e in sorted((min(max(s, lo), hi), min(max(e, lo), hi)) for s, e in blocks + extra):
        if e <= s:
            continue
        if run_end is None or s >= run_end:
            if run_end is not None:
                covered += run_end - run_start
            run_start, run_end = s, e
        else:
            run_end = max(run_end, e)
    if run_end is not None:
        covered += run_end - run_start
        last = max(last, run_end)
    return covered, last, lo


def _covered_np(img, f, flen: int, struct_end: int, extra):
    """(bytes covered, end of the last covered run, payload start) of the
    file from the payload start on, for the whole of ``f`` at once."""
    import numpy as np
    state, off, is_bitmap = f.state, f.start, f.is_bitmap
    present = (state == PAYLOAD_BLOCK_FULLY_PRESENT) | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    lengths = np.where(is_bitmap, MiB, img.block_size)
    starts, ends = off[present], off[present] + lengths[present]
    inside = starts < flen
    starts, ends = starts[inside], ends[inside]

    payload_start = struct_end + _QEMU_DATA_GAP
    above = starts[(starts >= struct_end) & ~is_bitmap[present][inside]]
    if len(above):
        payload_start = min(payload_start, int(above.min()) // MiB * MiB)
    s_all = np.concatenate([starts, np.array([s for s, _ in extra], np.int64)])
    e_all = np.concatenate([ends, np.array([e for _, e in extra], np.int64)])
    # clipped to [payload_start, EOF), in bytes
    lo = payload_start
    s_all = np.clip(s_all, lo, max(flen, lo))
    e_all = np.clip(e_all, lo, max(flen, lo))
    keep = e_all > s_all
    s_all, e_all = s_all[keep], e_all[keep]
    covered, last = 0, lo
    if len(s_all):
        order = np.argsort(s_all, kind="stable")
        s_all, e_all = s_all[order], e_all[order]
        run_end = np.maximum.accumulate(e_all)
        # a new run starts where the start is past every earlier end
        new_run = np.ones(len(s_all), bool)
        new_run[1:] = s_all[1:] >= run_end[:-1]
        run_ids = np.cumsum(new_run) - 1
        run_start = s_all[new_run]
        run_stop = np.zeros(len(run_start), np.int64)
        np.maximum.at(run_stop, run_ids, e_all)
        covered = int((run_stop - run_start).sum())
        last = max(last, int(run_stop.max()))
    return covered, last, lo
