"""Leaks: 1 MiB units of the file that nothing references."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import (MiB, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                         round_up)
from ..image import VHDXImage
from .entries import _bat_geometry, _offsets, _states

# qemu and blockdrv leave 4 MiB between the metadata region and the first block.
_QEMU_DATA_GAP = 4 * MiB


@dataclass
class _Leaks:
    units: int                  # leaked 1 MiB units
    trailing: int               # of which at the end of file (reclaimable)
    keep_length: int            # truncating to this reclaims the trailing ones


def _leaks(img: VHDXImage) -> _Leaks:
    flen = img.file_length()
    eof_units = -(-flen // MiB)
    entries, idx, is_bitmap, block, _ = _bat_geometry(img)
    state = _states(entries)
    off = _offsets(entries)
    present = (state == PAYLOAD_BLOCK_FULLY_PRESENT) | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    lengths = np.where(is_bitmap, MiB, img.block_size)
    starts, ends = off[present], off[present] + lengths[present]
    inside = starts < flen
    starts, ends = starts[inside], ends[inside]

    spans = img.structure_spans()
    struct_end = round_up(max(e for _, e in spans), MiB)
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
