"""qemu-img convert's sparse detection: which 512-byte sectors of a buffer
are zeros, and qemu-img's is_allocated_sectors{,_min} rules over them.

The scan looks only at sectors that start with a zero byte and checks them
with ``startswith`` (memcmp speed, no per-sector Python loop over data and
no numpy import); the rules work on runs of sectors.
"""

from __future__ import annotations

from bisect import bisect_right

SECTOR = 512
IO_BUF_SIZE = 2 << 20       # qemu-img convert's buffer: one read, one scan


_ZERO_SECTOR = bytes(SECTOR)
ZEROS = memoryview(bytes(IO_BUF_SIZE))     # what a zero range is compared with, or written as


def _zero_sectors_from(buf, sector: int, full: int) -> int:
    """Number of all-zero sectors of ``buf`` from ``sector`` on (at most up
    to sector ``full``): doubling, then bisecting, memcmp against zeros."""
    start = sector * SECTOR
    limit = full - sector
    if limit <= 0 or not buf.startswith(_ZERO_SECTOR, start):
        return 0
    good, step = 1, 1
    while good < limit:
        step = min(step * 2, limit - good)
        if not buf.startswith(ZEROS[:(good + step) * SECTOR], start):
            break
        good += step
    else:
        return good
    lo, hi = good, good + step      # zeros for lo sectors, not for hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if buf.startswith(ZEROS[:mid * SECTOR], start):
            lo = mid
        else:
            hi = mid
    return lo


def sector_runs(buf, nbytes: int) -> tuple[list[int], list[bool]]:
    """``buf[:nbytes]`` as runs of data / zero 512-byte sectors (a partial
    last sector counts as zero-padded): ``(run ends, run is data)``, the
    ends ascending sector indices, the last one the sector count.

    Only a sector whose first byte is zero can be a zero sector: a strided
    copy of the first bytes (1/512 of the buffer) is searched for them, so
    data is not read end to end; a candidate run is checked with one memcmp
    (which stops at the first non-zero byte), bisected only when it holds
    data."""
    full, tail = divmod(nbytes, SECTOR)
    total = full + (1 if tail else 0)
    zero_runs: list[list[int]] = []
    if full:
        firsts = buf[0:full * SECTOR:SECTOR]       # bytes or bytearray
        s = firsts.find(0)
        while s >= 0:
            if not buf.startswith(_ZERO_SECTOR, s * SECTOR):
                s = firsts.find(0, s + 1)       # data after a zero byte
                continue
            # sectors up to b start with a zero byte: zero candidates
            b = full - len(firsts[s:].lstrip(b"\0"))
            if buf.startswith(ZEROS[:(b - s) * SECTOR], s * SECTOR):
                n = b - s
            else:
                n = _zero_sectors_from(buf, s, b)
            if n:
                if zero_runs and zero_runs[-1][1] == s:
                    zero_runs[-1][1] = s + n
                else:
                    zero_runs.append([s, s + n])
            s = firsts.find(0, s + n + 1)   # sector s + n holds data
    if tail and buf.startswith(ZEROS[:tail], full * SECTOR):
        if zero_runs and zero_runs[-1][1] == full:
            zero_runs[-1][1] = total
        else:
            zero_runs.append([full, total])
    ends: list[int] = []
    data: list[bool] = []
    pos = 0
    for z, e in zero_runs:
        if z > pos:
            ends.append(z)
            data.append(True)
        ends.append(e)
        data.append(False)
        pos = e
    if pos < total:
        ends.append(total)
        data.append(True)
    return ends, data


class SparseScanner:
    """qemu-img's is_allocated_sectors{,_min} over runs of data and zero
    sectors, stepping from run to run instead of from sector to sector."""

    def __init__(self, nz, first_sector: int, alignment: int) -> None:
        """``nz``: one truth value per sector, true for data."""
        ends: list[int] = []
        data: list[bool] = []
        for i, flag in enumerate(nz):
            flag = bool(flag)
            if data and data[-1] == flag:
                ends[-1] = i + 1
            else:
                ends.append(i + 1)
                data.append(flag)
        self._init(ends, data, first_sector, alignment)

    @classmethod
    def from_runs(cls, ends: list[int], data: list[bool], first_sector: int,
                  alignment: int) -> "SparseScanner":
        self = cls.__new__(cls)
        self._init(ends, data, first_sector, alignment)
        return self

    def _init(self, ends, data, first_sector, alignment) -> None:
        self.run_ends = ends
        self.run_data = data
        self.first = first_sector
        self.alignment = alignment

    def _alloc(self, j: int, n: int) -> tuple[bool, int]:
        k = bisect_right(self.run_ends, j)
        end = self.run_ends[k]
        i = min(end, j + n) - j
        is_zero = not self.run_data[k]
        if i == n:                     # all the same: no reason to split
            return not is_zero, i
        tail = (self.first + j + i) & (self.alignment - 1)
        if tail:
            if is_zero and i <= tail:
                is_zero = False        # a short zero tail counts as data
            if not is_zero:
                i = min(i + self.alignment - tail, n)
            else:
                i -= tail
        return not is_zero, i

    def alloc_min(self, j: int, n: int, min_sparse: int) -> tuple[bool, int]:
        """(is data, sectors) for the run at ``j``: data absorbs zero gaps
        shorter than ``min_sparse`` sectors."""
        min_sparse = min(min_sparse, n)
        ret, pnum = self._alloc(j, n)
        if not ret:
            return False, pnum
        used = checked = pnum
        j, n = j + pnum, n - pnum
        while n > 0:
            ret, pnum = self._alloc(j, n)
            j, n, checked = j + pnum, n - pnum, checked + pnum
            if ret:
                used = checked
            elif pnum >= min_sparse:
                break
        return True, used
