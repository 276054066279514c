"""Fuzzing the VHDX driver: mutated images never crash it.

Each example takes a valid image (dynamic, fixed, or with a pending log),
applies 1-4 mutations to headers, region tables, the metadata table and
items, the BAT, log entries, or the file length -- re-sealing checksums most
of the time so the parser meets the bad values -- then:

* opens it read-only, reads every block (a sample of at most 256 for huge
  disks), runs check: only ``BlockDriverError`` may escape, and the file's
  bytes stay the same;
* on a copy: opens it read-write, reads and writes, closes; runs
  ``check -r all`` and, when that reports the image clean, opens and reads it
  again -- a repaired image must be usable;
* every example runs under a time budget (SIGALRM) and a Python allocation
  budget (tracemalloc), so a hang or an allocation sized by an unchecked
  field fails the test.

``pytest tests/fuzz`` runs the derandomized ``ci`` profile (200 examples);
``pytest -m slow tests/fuzz`` runs thousands (profile ``long``).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockdrv
from blockdrv.testing.budget import time_budget
from blockdrv.block import open_node
from blockdrv.errors import BlockDriverError
from blockdrv.common import FIX_ERRORS, FIX_LEAKS, O_CHECK, O_RDWR
from blockdrv.testing.compare import file_digest
from blockdrv.testing.vhdx.corrupt import (HEADER_OFFSETS, REGION_OFFSETS, KiB, MiB, Vhdx,
                                           crc_seal, make_dirty_log)

TIME_BUDGET = 20          # seconds per example
MEMORY_BUDGET = 48 * MiB  # Python allocation peak per example
MAX_BLOCKS_READ = 256


# --------------------------------------------------------------------------- bases

_BASES: dict[str, bytes] = {}


def _bases() -> dict[str, bytes]:
    if _BASES:
        return _BASES
    d = tempfile.mkdtemp(prefix="vhdx-fuzz-")
    p = os.path.join(d, "dyn.vhdx")
    img = blockdrv.create_image(p, "vhdx", "8M", block_size="1M")
    img.write(0, b"A" * 4096)
    img.write(3 * MiB + 512, b"B" * 1024)
    img.write(7 * MiB, b"C" * 4096)
    img.close()
    _BASES["dynamic"] = Vhdx.load(p).data
    p = os.path.join(d, "fixed.vhdx")
    blockdrv.create_image(p, "vhdx", "3M", subformat="fixed", block_state_zero="off",
                          block_size="1M").close()
    _BASES["fixed"] = Vhdx.load(p).data
    p = os.path.join(d, "dirty.vhdx")
    make_dirty_log(p, size="8M", block_size="1M")
    _BASES["dirty"] = Vhdx.load(p).data
    p = os.path.join(d, "4k.vhdx")
    img = blockdrv.create_image(p, "vhdx", "4M", block_size="1M", logical_sector_size="4096")
    img.write(MiB, b"D" * 4096)
    img.close()
    _BASES["4k"] = Vhdx.load(p).data
    shutil.rmtree(d)
    return _BASES


# --------------------------------------------------------------------------- mutations

INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 0x7F, 0x80, 0xFF, 0x100, 511, 512, 1024, 2047, 2048,
               4095, 4096, 65535, 65536, MiB - 1, MiB, MiB + 1, 3 * MiB, 256 * MiB,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 64 << 40, 1 << 44,
               (1 << 63) - 1, 1 << 63, (1 << 64) - MiB, (1 << 64) - 1]

widths = st.sampled_from(["B", "H", "I", "Q"])


@st.composite
def values(draw, fmt):
    bits = struct.calcsize("<" + fmt) * 8
    v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << bits) - 1)))
    return v & ((1 << bits) - 1)


@st.composite
def mutation(draw, kind_names):
    kind = draw(st.sampled_from(kind_names))
    fmt = draw(widths)
    return (kind, fmt, draw(values(fmt)), draw(st.integers(0, 1 << 20)),
            draw(st.booleans()), draw(st.integers(0, 3)))


def apply(v: Vhdx, m) -> None:
    kind, fmt, value, where, flag, small = m
    size = struct.calcsize("<" + fmt)
    reseal = small != 0          # 3 times in 4, re-seal checksums
    if kind == "header":
        idxs = [(0, 1), (0,), (1,), (v.current,)][small]
        at = where % 80 if flag else where % (4 * KiB - size)
        for i in idxs:
            v.put(fmt, HEADER_OFFSETS[i] + at, value)
            if reseal or at in range(4, 8):
                crc_seal(v.data, HEADER_OFFSETS[i], 4 * KiB)
    elif kind == "region":
        count = min(v.u("I", REGION_OFFSETS[0] + 8), 8)
        at = where % (16 + 32 * (count + 1) - size)
        for c in ((0, 1) if flag else (small % 2,)):
            v.put(fmt, REGION_OFFSETS[c] + at, value)
            if reseal:
                crc_seal(v.data, REGION_OFFSETS[c], 64 * KiB)
    elif kind == "metadata_table":
        base = _metadata_base(v)
        if base is None:
            return
        at = where % (32 + 32 * 7 - size)
        v.put(fmt, base + at, value)
    elif kind == "metadata_item":
        base = _metadata_base(v)
        if base is None:
            return
        at = 64 * KiB + where % (96 - size) if flag else 64 * KiB + where % (4 * KiB)
        v.put(fmt, base + at, value)
    elif kind == "bat":
        base = _bat_base(v)
        if base is None:
            return
        idx = where % 16
        if flag:   # structured entry: a state and a MiB offset
            value = ((value % (1 << 44)) << 20) | (small * 2 + (where >> 8) % 2)
            v.put("Q", base + 8 * idx, value & ((1 << 64) - 1))
        else:
            v.put(fmt, base + 8 * idx + (where >> 4) % 8 % (9 - size), value)
    elif kind == "log":
        starts = v.log_entries() if _log_ok(v) else []
        if not starts:
            return
        at0 = starts[0]
        length = min(v.u("I", at0 + 8), 2 * 4 * KiB)
        at = where % max(length - size, 1) if flag else where % 64
        v.put(fmt, at0 + at, value)
        if reseal and 4 * KiB <= v.u("I", at0 + 8) <= 2 * 4 * KiB \
                and at0 + v.u("I", at0 + 8) <= len(v.data):
            v.reseal_log_entry(at0)
    elif kind == "truncate":
        n = len(v.data)
        cut = [0, 8, 64 * KiB, 192 * KiB, MiB, 2 * MiB, 3 * MiB, 4 * MiB, n - MiB, n - 1,
               n - 4096][small * 2 + flag] if where % 3 else where % max(n, 1)
        v.truncate(max(min(cut, n), 0))
    elif kind == "extend":
        v.truncate(len(v.data) + (where % (4 * MiB) if flag else MiB * (small + 1)))
    elif kind == "flip":
        at = where % min(len(v.data), 5 * MiB) if v.data else 0
        if v.data:
            v.data[at] ^= (value & 0xFF) or 1


def _metadata_base(v):
    try:
        off = v.metadata_offset
    except (StopIteration, struct.error):
        return None
    return off if off + 64 * KiB + 4 * KiB <= len(v.data) else None


def _bat_base(v):
    try:
        off = v.bat_offset
    except (StopIteration, struct.error):
        return None
    return off if off + 128 <= len(v.data) else None


def _log_ok(v):
    try:
        return v.log_offset + v.log_length <= len(v.data) and v.log_length <= 8 * MiB
    except struct.error:
        return False


KINDS = ["header", "region", "metadata_table", "metadata_item", "bat", "bat", "bat", "log",
         "log", "truncate", "extend", "flip"]


# --------------------------------------------------------------------------- the oracle

def _read_blocks(img) -> None:
    size = img.size
    info = img.info()
    bsize = info.cluster_size or MiB
    blocks = -(-size // bsize)
    picks = range(blocks) if blocks <= MAX_BLOCKS_READ else \
        sorted({*range(64), *range(blocks - 64, blocks),
                *(i * blocks // 128 for i in range(128))})
    for b in picks:
        start = b * bsize
        n = min(bsize, size - start)
        try:
            if n <= MiB:
                img.read(start, n)
            else:
                img.read(start, 4096)
                img.read(start + n - 4096, 4096)
        except BlockDriverError:
            pass        # e.g. PARTIALLY_PRESENT: a clear error is the right answer


def _check(path, fix):
    try:
        bs = open_node(path, "vhdx", O_CHECK | (O_RDWR if fix else 0))
    except BlockDriverError:
        return None
    try:
        return bs.check(fix)
    finally:
        bs.close()


def exercise(data: bytes, workdir: str, stats: dict[str, int]) -> None:
    stats["examples"] += 1
    path = os.path.join(workdir, "img.vhdx")
    with open(path, "wb") as fh:
        fh.write(data)
    before = file_digest(path)

    # read-only: open, read, check -- nothing may be written
    try:
        with blockdrv.open_image(path, "vhdx") as img:
            stats["opened_ro"] += 1
            _read_blocks(img)
            img.info()
    except BlockDriverError:
        stats["refused"] += 1
    r = _check(path, 0)
    assert file_digest(path) == before, "read-only open or check wrote to the image"
    if r is not None:
        assert r.check_errors == 0, r.messages

    # read-write on a copy
    rw = os.path.join(workdir, "rw.vhdx")
    shutil.copyfile(path, rw)
    try:
        with blockdrv.open_image(rw, "vhdx", readonly=False) as img:
            stats["opened_rw"] += 1
            _read_blocks(img)
            if img.size >= 8192:
                img.write(img.size // 2 // 512 * 512, b"w" * 512)
                assert img.read(img.size // 2 // 512 * 512, 512) == b"w" * 512
    except BlockDriverError:
        pass

    # repair a fresh copy, then the image must be usable if check says clean
    shutil.copyfile(path, rw)
    r = _check(rw, FIX_LEAKS | FIX_ERRORS)
    if r is not None and r.corruptions_fixed + r.leaks_fixed:
        stats["repaired"] += 1
    if r is not None and not (r.corruptions or r.check_errors):
        again = _check(rw, 0)
        assert again is not None and again.corruptions == 0, again and again.messages
        with blockdrv.open_image(rw, "vhdx") as img:
            _read_blocks(img)


def run_example(base_name, muts, stats: dict[str, int]) -> None:
    v = Vhdx(_bases()[base_name])
    for m in muts:
        try:
            apply(v, m)
        except (struct.error, StopIteration, IndexError, ValueError):
            pass        # a mutation that no longer fits the (already broken) file
    with tempfile.TemporaryDirectory(prefix="vhdx-fuzz-") as workdir:
        tracemalloc.start()
        try:
            with time_budget(TIME_BUDGET):
                exercise(bytes(v.data), workdir, stats)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BUDGET, f"allocation peak {peak} bytes"


examples = st.tuples(st.sampled_from(["dynamic", "dynamic", "fixed", "dirty", "dirty", "4k"]),
                     st.lists(mutation(KINDS), min_size=1, max_size=4))


@given(examples)
def test_fuzz_vhdx(fuzz_stats, example):
    run_example(*example, fuzz_stats)


@pytest.mark.slow
@settings(settings.get_profile("long"))
@given(examples)
def test_fuzz_vhdx_long(fuzz_stats, example):
    run_example(*example, fuzz_stats)
