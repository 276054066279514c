"""The BAT entries ``check`` looks at, as numpy arrays, and the file's layout."""

from __future__ import annotations

import numpy as np

from ..constants import BAT_OFFSET_MASK, BAT_OFFSET_SHIFT, BAT_STATE_MASK
from ..image import VHDXImage

_OFF_MASK = np.uint64(BAT_OFFSET_MASK)
_STATE_MASK = np.uint64(BAT_STATE_MASK)
_RESERVED_MASK = np.uint64(((1 << BAT_OFFSET_SHIFT) - 1) & ~BAT_STATE_MASK)
_INT64_MAX = (1 << 63) - 1


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


def _states(entries: np.ndarray) -> np.ndarray:
    return (entries & _STATE_MASK).astype(np.uint8)


def _offsets(entries: np.ndarray) -> np.ndarray:
    """File offsets as int64; an offset that overflows int64 saturates."""
    return np.minimum(entries & _OFF_MASK, np.uint64(_INT64_MAX)).astype(np.int64)


def _block_lengths(img: VHDXImage, block: np.ndarray) -> np.ndarray:
    """Bytes of each payload block inside the virtual disk (the last may be short)."""
    rest = img.virtual_size - block * img.block_size
    return np.clip(rest, 0, img.block_size)

