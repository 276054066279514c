"""Block allocation table (spec 2.5).

The BAT interleaves one sector-bitmap entry after every ``chunk_ratio``
payload entries.  It can hold ~67 million entries (64 TiB in 1 MiB blocks), so
it is kept as the raw bytes -- no Python object per entry.  Single entries are
read through a ``memoryview`` cast to uint64; whole-table questions are
answered with vector ops on a numpy ``<u8`` view of the same bytes.

numpy costs ~40 ms to import, more than the rest of a short command, so the
two whole-table questions every open asks (the open validation in .validate,
and count_states) first
try a numpy-free scan: a typical table is a "background" -- every payload
entry one absent state without offset (NOT_PRESENT, or ZERO as qemu creates
dynamic images), every bitmap entry zero -- plus a few entries that differ.
memcmp against a template of the background (``bytes.startswith``) finds
those few; tables with many of them go to numpy.
"""

from __future__ import annotations

import sys

from blockdrv._startup import lazy_module
from blockdrv.errors import CorruptImageError

from .constants import (ALIGNMENT, BAT_OFFSET_MASK, BAT_STATE_MASK, MAX_SECTORS_PER_BLOCK, MiB,
                        PAYLOAD_BLOCK_FULLY_PRESENT, SECTOR_BITMAP_BLOCK_SIZE, round_up)



# numpy on first use: the geometry helpers below are all that ``create``
# needs, and the memcmp scans answer ordinary tables without it
np = lazy_module("numpy", globals(), "np")


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks described by one sector bitmap block (spec 2.5)."""
    return MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def data_blocks_count(virtual_size: int, block_size: int) -> int:
    return -(-virtual_size // block_size)


def bitmap_blocks_count(data_blocks: int, ratio: int) -> int:
    return -(-data_blocks // ratio)


def total_entries(virtual_size: int, block_size: int, logical_sector_size: int, *,
                  differencing: bool = False) -> int:
    """Number of BAT entries.

    Dynamic/fixed: the last entry is the last payload block, hence
    ``data + (data - 1) // ratio`` (0 for an empty disk; qemu 7.2 computes that
    in uint32 and underflows, giving an oversized BAT for size 0).
    Differencing: whole chunks, ``bitmaps * (ratio + 1)``.
    """
    ratio = chunk_ratio(block_size, logical_sector_size)
    data = data_blocks_count(virtual_size, block_size)
    if differencing:
        return bitmap_blocks_count(data, ratio) * (ratio + 1)
    return data + (data - 1) // ratio if data else 0


def region_length(entries: int) -> int:
    """BAT region length qemu uses: entries rounded up to 1 MiB (at least 1 MiB)."""
    return max(ALIGNMENT, round_up(entries * 8, ALIGNMENT))


def payload_index(block: int, ratio: int) -> int:
    """BAT index of payload block ``block`` (skips the interleaved bitmap entries)."""
    return block + block // ratio


def bitmap_index(chunk: int, ratio: int) -> int:
    """BAT index of the sector bitmap entry of chunk ``chunk``."""
    return chunk * (ratio + 1) + ratio


def entry_run(first: int, last: int, ratio: int, state: int, base: int | None = None,
              base_block: int = 0, block_size: int = 0):
    """BAT entries ``[first, last)`` as a numpy ``<u8`` array: payload entries
    in ``state`` -- at file offset ``base + (block - base_block) * block_size``
    when ``base`` is given -- and sector bitmap entries 0."""
    idx = np.arange(first, last, dtype=np.int64)
    chunk, pos = np.divmod(idx, ratio + 1)
    values = np.full(len(idx), state, dtype="<u8")
    if base is not None:
        block = chunk * ratio + pos
        values |= (np.uint64(base)
                   + (block - base_block).astype(np.uint64) * np.uint64(block_size))
    values[pos == ratio] = 0
    return values


def encode_entry(state: int, file_offset: int = 0) -> int:
    if file_offset % MiB or not 0 <= file_offset < (1 << 64) or not 0 <= state <= 7:
        raise ValueError(f"bad BAT entry: state {state}, offset {file_offset}")
    return file_offset | state


def decode_entry(raw: int) -> tuple[int, int]:
    """(state, file offset in bytes)."""
    raw = int(raw)
    return raw & BAT_STATE_MASK, raw & BAT_OFFSET_MASK


# Entries per template compare of the numpy-free scan, and the most
# differing entries it collects before handing the table to numpy.
_BG_GROUP = 1 << 15
_BG_LEAF = 64
_BG_LIMIT = 4096
_LITTLE = sys.byteorder == "little"


class Bat:
    """The BAT of one image, as little-endian uint64 entries over ``buf``.

    Pass a ``bytearray`` to get a writable table (``set`` updates ``buf``).
    ``entries`` is a numpy view of ``buf`` (numpy is imported on first use).
    """

    def __init__(self, buf, virtual_size: int, block_size: int,
                 logical_sector_size: int = 512, *, differencing: bool = False):
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.chunk_ratio = chunk_ratio(block_size, logical_sector_size)
        self.data_blocks = data_blocks_count(virtual_size, block_size)
        self.differencing = differencing
        self.total_entries = total_entries(virtual_size, block_size, logical_sector_size,
                                           differencing=differencing)
        if len(buf) < self.total_entries * 8:
            raise CorruptImageError(f"VHDX BAT region too small for {self.total_entries} entries")
        self.buf = buf
        self._entries = None
        self._q = None
        # (limit, result) of the last background_scan: an open validates the
        # table with one and ``info`` counts states with another; set(),
        # set_raw_at() and store(), the only writers of the table, drop it
        self._scanned = None
        if _LITTLE:
            try:
                self._q = memoryview(buf).cast("B")[:self.total_entries * 8].cast("Q")
            except (TypeError, ValueError):
                self._q = None

    @property
    def entries(self):
        """The table as a numpy ``<u8`` array viewing ``buf``."""
        if self._entries is None:
            self._entries = np.frombuffer(self.buf, dtype="<u8", count=self.total_entries)
        return self._entries

    def raw_at(self, index: int) -> int:
        """The raw entry at BAT index ``index``."""
        q = self._q
        return q[index] if q is not None else int(self.entries[index])

    def raw(self, block: int) -> int:
        """The raw entry of payload block ``block``."""
        if not 0 <= block < self.data_blocks:
            raise IndexError(f"block {block} out of range")
        i = block + block // self.chunk_ratio
        q = self._q
        return q[i] if q is not None else int(self.entries[i])

    def to_bytes(self) -> bytes:
        return bytes(self.buf)

    # --- single entries -------------------------------------------------
    def index(self, block: int) -> int:
        if not 0 <= block < self.data_blocks:
            raise IndexError(f"block {block} out of range")
        return payload_index(block, self.chunk_ratio)

    def get(self, block: int) -> tuple[int, int]:
        return decode_entry(self.raw(block))

    def set(self, block: int, state: int, file_offset: int = 0) -> int:
        """Update a payload entry; returns its BAT index (byte offset = 8 * index)."""
        i = self.index(block)
        value = encode_entry(state, file_offset)
        self._scanned = None
        if self._q is not None:
            self._q[i] = value
        else:
            self.entries[i] = value
        return i

    def set_raw_at(self, index: int, value: int) -> None:
        """Store a raw entry at BAT index ``index`` (sector bitmap entries)."""
        if not 0 <= index < self.total_entries:
            raise IndexError(f"BAT index {index} out of range")
        self._scanned = None
        if self._q is not None:
            self._q[index] = value
        else:
            self.entries[index] = value

    def store(self, first: int, chunk) -> None:
        """Store the native-order ``array('Q')`` ``chunk`` at BAT index
        ``first`` (a repair's journalled run)."""
        if not 0 <= first <= first + len(chunk) <= self.total_entries:
            raise IndexError(f"BAT indexes {first}+{len(chunk)} out of range")
        self._scanned = None
        if self._q is not None:
            self._q[first:first + len(chunk)] = memoryview(chunk)
        else:
            self.entries[first:first + len(chunk)] = chunk.tolist()

    # --- numpy-free scan ------------------------------------------------
    def background_scan(self, limit: int = _BG_LIMIT):
        """(background payload value, [(BAT index, raw entry), ...]) for the
        entries of ``[0, payload end)`` that differ from the background (see
        the module docstring), in index order -- or None when the table has
        more than ``limit`` differing entries."""
        scanned = self._scanned
        if scanned is not None:
            # a whole answer serves any limit; "more than L differ" serves
            # the limits up to L
            done_limit, result = scanned
            if result is not None:
                return result if len(result[1]) <= limit else None
            if limit <= done_limit:
                return None
        result = self._background_scan(limit)
        self._scanned = (limit, result)
        return result

    def _background_scan(self, limit: int):
        q = self._q
        starts = self._starts()
        if q is None or starts is None:
            return None
        n = self._payload_end()
        if n == 0:
            return 0, []
        step = self.chunk_ratio + 1
        bg = self._background(n, step)
        if bg is None:
            # no absent state to speak of (a dense image): judge every entry
            # against NOT_PRESENT, so a small table (up to ``limit`` present
            # entries) is still answered here
            bg = 0
        period = bg.to_bytes(8, "little") * (step - 1) + bytes(8)
        reps = -(-min(_BG_GROUP, n) // step) + 1
        tmpl = memoryview(period * reps)     # any phase: start at (i % step) * 8
        out: list[tuple[int, int]] = []
        todo = [(lo, min(lo + _BG_GROUP, n)) for lo in range(0, n, _BG_GROUP)]
        todo.reverse()
        while todo:
            lo, hi = todo.pop()
            ph = (lo % step) * 8
            if starts(tmpl[ph:ph + (hi - lo) * 8], lo * 8):
                continue
            if hi - lo > _BG_LEAF:
                mid = (lo + hi) // 2
                todo.append((mid, hi))
                todo.append((lo, mid))
                continue
            for i in range(lo, hi):
                value = q[i]
                if value != (0 if i % step == step - 1 else bg):
                    out.append((i, value))
            if len(out) > limit:
                return None
        return bg, out

    def _starts(self):
        """``starts(sub, pos)``: does the table's byte ``pos`` begin ``sub``
        -- one memcmp, whatever holds the table; None if nothing can."""
        buf = self.buf
        if self._q is None:
            return None
        if isinstance(buf, (bytes, bytearray)):
            return buf.startswith
        if hasattr(buf, "find"):            # mmap: a bounded find is a memcmp
            def starts(sub, pos, _find=buf.find):
                return _find(sub, pos, pos + len(sub)) == pos
            return starts
        return None

    def same_run(self, block: int, end: int) -> int:
        """How many payload blocks of ``[block, end)`` in a row, from
        ``block``, hold the entry ``block`` holds (with zero sector bitmap
        entries between them).  Block status of a sparse table asks this
        for every absent stretch: memcmps of growing spans against a
        template, never a Python step per entry."""
        end = min(end, self.data_blocks)
        if block >= end:
            return 0
        value = self.raw(block)
        step = self.chunk_ratio + 1
        q, starts = self._q, self._starts()
        lo = payload_index(block, self.chunk_ratio)
        hi = payload_index(end - 1, self.chunk_ratio) + 1
        pos = lo
        if starts is not None:
            tmpl = self._template(value, step)
            span = _BG_LEAF
            while pos < hi:
                n = min(span, hi - pos, _BG_GROUP)
                ph = (pos % step) * 8
                if starts(tmpl[ph:ph + n * 8], pos * 8):
                    pos += n
                    span *= 2
                elif n > _BG_LEAF:
                    span = n // 2
                else:
                    break
        for pos in range(pos, hi):          # the last few, one by one
            if q is not None:
                got = q[pos]
            else:
                got = int(self.entries[pos])
            if got != (0 if pos % step == step - 1 else value):
                break
        else:
            pos = hi
        return (pos - pos // step) - block

    def _template(self, value: int, step: int) -> memoryview:
        """``value`` in every payload slot and 0 in every bitmap slot, for
        spans of up to ``_BG_GROUP`` entries at any phase (kept per value)."""
        cached = getattr(self, "_tmpl", None)
        if cached is not None and cached[0] == value and cached[1] == step:
            return cached[2]
        period = value.to_bytes(8, "little") * (step - 1) + bytes(8)
        tmpl = memoryview(period * (-(-_BG_GROUP // step) + 1))
        self._tmpl = (value, step, tmpl)
        return tmpl

    _BG_SAMPLES = 64

    def _background(self, n: int, step: int) -> int | None:
        """The absent payload state most of the table is in: the commonest
        offset-free value among payload entries sampled evenly over
        ``[0, n)`` (the first block is often allocated, so entry 0 alone is
        no guide), or None when no sample is such a value."""
        q = self._q
        votes: dict[int, int] = {}
        stride = max(1, n // self._BG_SAMPLES)
        for i in range(0, n, stride):
            if i % step == step - 1:
                i -= 1                       # a bitmap entry: take the payload before it
                if i < 0:
                    continue
            v = q[i]
            if not v >> 3 and v < PAYLOAD_BLOCK_FULLY_PRESENT:
                votes[v] = votes.get(v, 0) + 1
        return max(votes, key=votes.get) if votes else None

    # --- vector views ---------------------------------------------------
    def _grid(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``arr`` (one value per BAT entry) as (payload in block order, bitmaps).

        Whole chunks reshape to rows of ``ratio`` payload entries plus one
        bitmap entry, so no index arrays are built.  Payload is a copy.
        """
        step = self.chunk_ratio + 1
        full = self.total_entries // step
        grid = arr[:full * step].reshape(full, step)
        payload = np.concatenate([grid[:, :-1].ravel(), arr[full * step:]])
        return payload[:self.data_blocks], grid[:, -1]

    def _low_bytes(self) -> np.ndarray:
        """(N, 8) uint8 view; column 0 holds the state, little-endian on any host."""
        return self.entries.view(np.uint8).reshape(-1, 8)

    def payload_entries(self) -> np.ndarray:
        """Raw payload entries in block order (a copy)."""
        return self._grid(self.entries)[0]

    def states(self) -> np.ndarray:
        """uint8 state of every payload block, in block order."""
        return self._grid(self._low_bytes()[:, 0] & BAT_STATE_MASK)[0]

    def offsets(self) -> np.ndarray:
        """uint64 file offset of every payload block (0 where none)."""
        return self.payload_entries() & np.uint64(BAT_OFFSET_MASK)

    def count_states(self) -> dict[int, int]:
        """Payload blocks per state, in one chunked pass over the state bytes."""
        scan = self.background_scan()
        if scan is not None:
            bg, diff = scan
            step = self.chunk_ratio + 1
            by_state = [0] * 8
            payload = [v for i, v in diff if i % step != step - 1]
            by_state[bg & BAT_STATE_MASK] = self.data_blocks - len(payload)
            for v in payload:
                by_state[v & BAT_STATE_MASK] += 1
            return {state: n for state, n in enumerate(by_state) if n}
        counts = np.zeros(8, np.int64)
        for lo, st in self._state_chunks():
            first = st[0]
            if (st == first).all():         # the usual case: a uniform stretch
                counts[first] += len(st)
            else:
                counts += np.bincount(st, minlength=8)
        # the interleaved sector-bitmap entries are not payload blocks
        step = self.chunk_ratio + 1
        end = self._payload_end()
        low = self.entries.view(np.uint8)[::8]
        counts -= np.bincount(low[step - 1:end:step] & BAT_STATE_MASK, minlength=8)
        return {state: int(n) for state, n in enumerate(counts) if n}

    # Entries per chunk of the chunked scans: bounds their temporaries to a
    # few MiB whatever the size of the table.
    SCAN_CHUNK = 1 << 21

    def _payload_end(self) -> int:
        """BAT index past the last payload entry (differencing tables have
        whole chunks, the rest is unused)."""
        return min(payload_index(self.data_blocks, self.chunk_ratio), self.total_entries)

    def _state_chunks(self):
        """(first BAT index, uint8 states) per chunk of ``[0, payload end)``,
        read through a strided view of each entry's low byte (no copy of the
        table).  Sector-bitmap entries are included; callers drop them."""
        n = self._payload_end()
        low = self.entries.view(np.uint8)[::8]
        for lo in range(0, n, self.SCAN_CHUNK):
            yield lo, low[lo:min(lo + self.SCAN_CHUNK, n)] & BAT_STATE_MASK

    def present_end(self) -> int:
        """End of the furthest block a present entry references (0 if none):
        a payload block is ``block_size`` long, a sector bitmap block 1 MiB.
        Chunked (bounded temporaries); offsets are the raw 44-bit fields."""
        step = self.chunk_ratio + 1
        mask = np.uint64(BAT_OFFSET_MASK)
        entries = self.entries
        low = entries.view(np.uint8)[::8]
        end = 0
        for lo in range(0, len(entries), self.SCAN_CHUNK):
            st = low[lo:lo + self.SCAN_CHUNK] & BAT_STATE_MASK
            idx = np.flatnonzero(st >= PAYLOAD_BLOCK_FULLY_PRESENT) + lo      # 6 or 7
            if not len(idx):
                continue
            offs = entries[idx] & mask
            bitmap = idx % step == step - 1
            if (~bitmap).any():
                end = max(end, int(offs[~bitmap].max()) + self.block_size)
            if bitmap.any():
                end = max(end, int(offs[bitmap].max()) + SECTOR_BITMAP_BLOCK_SIZE)
        return end
