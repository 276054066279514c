"""Fuzzing the qcow2 driver through the command line: hostile images never
crash it, hang it, make it allocate what a header claims, or write to them.

Each example takes a valid image made by qemu-img (v3 with data and
snapshots, v2, extended L2, 512-byte clusters, zlib and zstd compressed
clusters, one with a backing file) and applies 1-4 mutations to its header,
header extensions, L1 and L2 entries, refcount table and block, snapshot
table, or its length.  Then ``info`` (human and JSON), ``snapshot -l``,
``check``, ``map`` and ``convert -O raw`` (the whole disk) run in-process:
each either succeeds or exits non-zero with exactly one error line -- never
an "internal error" (a traceback caught by the last line of defence).  Every
example runs under a time budget (SIGALRM) and a Python allocation budget
(tracemalloc), and the image's bytes are hashed before and after.

``pytest tests/fuzz`` runs the derandomized ``ci`` profile (200 examples);
``pytest -m slow tests/fuzz`` runs thousands (profile ``long``).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdrv.testing.budget import time_budget
from blockdrv.cli import main
from blockdrv.drivers.qcow2.header import Header
from blockdrv.testing.compare import file_digest
from blockdrv.testing.qemu import run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop

TIME_BUDGET = 20            # seconds per example (all commands)
MEMORY_BUDGET = 64 << 20    # Python allocation peak per example
MiB = 1 << 20


# --------------------------------------------------------------------------- bases

_BASES: dict[str, bytes] = {}
BACKING_SIZE = 8 * MiB      # base.raw (sparse) beside every example
WRITES = ["write -P 0xab 0 100k", "write -z 1M 128k", "write -P 0x11 3M 4k",
          "write -P 0x33 5M 256k", "discard 5M 64k"]


def _qemu(*args):
    rc, out, err = run_qemu_img(*args)
    assert rc == 0, err


def _make(d, name, opts, size="8M", snapshots=(), compress=None, backing=False):
    path = os.path.join(d, name)
    extra = ["-b", "base.raw", "-F", "raw"] if backing else []
    _qemu("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *extra, path, size)
    rc, out, err = run_qemu_io(path, WRITES, fmt="qcow2")
    assert rc == 0, (out, err)
    for s in snapshots:
        _qemu("snapshot", "-c", s, path)
        assert run_qemu_io(path, ["write -P 0x5c 2M 64k"], fmt="qcow2")[0] == 0
    if compress:
        out = path + ".c"
        _qemu("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compress}",
              path, out)
        os.replace(out, path)
    with open(path, "rb") as f:
        return f.read()


def _bases() -> dict[str, bytes]:
    if _BASES:
        return _BASES
    with tempfile.TemporaryDirectory(prefix="qcow2-fuzz-") as d:
        with open(os.path.join(d, "base.raw"), "wb") as f:
            f.truncate(BACKING_SIZE)
        _BASES["v3"] = _make(d, "v3.qcow2", "", snapshots=["one", "two words"])
        _BASES["v2"] = _make(d, "v2.qcow2", "compat=0.10", snapshots=["old"])
        _BASES["extl2"] = _make(d, "e.qcow2", "extended_l2=on,cluster_size=32k")
        _BASES["512"] = _make(d, "s.qcow2", "cluster_size=512,refcount_bits=1")
        _BASES["zlib"] = _make(d, "z.qcow2", "cluster_size=4k", compress="zlib")
        _BASES["zstd"] = _make(d, "zs.qcow2", "", compress="zstd")
        _BASES["backed"] = _make(d, "b.qcow2", "", backing=True)
    return _BASES


# --------------------------------------------------------------------------- mutations

INTERESTING = [0, 1, 2, 3, 7, 8, 9, 12, 16, 21, 22, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 511,
               512, 4096, 65535, 65536, 65537, MiB - 1, MiB, 32 * MiB, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 56, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 512, (1 << 64) - 1]

# header fields: (offset, width)
HEADER_FIELDS = [(4, "I"), (8, "Q"), (16, "I"), (20, "I"), (24, "Q"), (32, "I"),
                 (36, "I"), (40, "Q"), (48, "Q"), (56, "I"), (60, "I"), (64, "Q"),
                 (72, "Q"), (80, "Q"), (88, "Q"), (96, "I"), (100, "I"), (104, "B")]

KINDS = ["header", "header", "header", "extension", "l1", "l2", "l2", "l2_flags",
         "reftable", "refblock", "snapshot", "snapshot", "truncate", "extend", "flip"]

widths = st.sampled_from(["B", "H", "I", "Q"])


@st.composite
def values(draw, fmt):
    bits = struct.calcsize(">" + fmt) * 8
    v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << bits) - 1)))
    return v & ((1 << bits) - 1)


@st.composite
def mutation(draw):
    fmt = draw(widths)
    return (draw(st.sampled_from(KINDS)), fmt, draw(values(fmt)),
            draw(st.integers(0, 1 << 20)), draw(st.integers(0, 3)))


class Image:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.h = Header.parse(bytes(self.data[:1 << 21]))

    def u(self, fmt, at):
        return struct.unpack_from(">" + fmt, self.data, at)[0]

    def put(self, fmt, at, value):
        size = struct.calcsize(">" + fmt)
        if 0 <= at and at + size <= len(self.data):
            struct.pack_into(">" + fmt, self.data, at, value & ((1 << size * 8) - 1))

    def first_table(self, table_offset, entries, mask=0x00FFFFFFFFFFFE00):
        """The first non-zero entry's target of an 8-byte-entry table."""
        for i in range(entries):
            at = table_offset + 8 * i
            if at + 8 > len(self.data):
                return None
            target = self.u("Q", at) & mask
            if target:
                return target
        return None


def apply(img: Image, m) -> None:
    kind, fmt, value, where, small = m
    h, cs = img.h, img.h.cluster_size
    size = struct.calcsize(">" + fmt)
    if kind == "header":
        off, width = HEADER_FIELDS[where % len(HEADER_FIELDS)]
        img.put(width, off, value if small else value % 64)
    elif kind == "extension":
        # the extension headers after the fixed header: type, length, data
        at = h.header_length + where % 256
        img.put(fmt, at, value)
    elif kind == "l1":
        at = h.l1_table_offset + 8 * (where % max(h.l1_size, 1))
        img.put("Q", at, value if small else (value << 9 | (1 << 63)) & ((1 << 64) - 1))
    elif kind in ("l2", "l2_flags"):
        l2 = img.first_table(h.l1_table_offset, h.l1_size)
        if l2 is None:
            return
        at = l2 + (where * 8) % cs
        if kind == "l2":
            img.put(fmt, at + (where >> 12) % (9 - size), value)
        else:   # flip the copied / compressed / zero flags, or the reserved bits
            bit = [63, 62, 0, 1 + value % 8][small]
            img.put("Q", at, img.u("Q", at) ^ (1 << bit) if at + 8 <= len(img.data) else 0)
    elif kind == "reftable":
        at = h.refcount_table_offset + 8 * (where % 16)
        img.put("Q", at, value if small else value << 9)
    elif kind == "refblock":
        rb = img.first_table(h.refcount_table_offset, 4)
        if rb is not None:
            img.put(fmt, rb + where % (cs - size), value)
    elif kind == "snapshot":
        if not h.snapshots_offset:
            return
        # the first entry's fixed fields (40 bytes) and what follows them
        at = h.snapshots_offset + (where % 40 if small else where % 512)
        img.put(fmt, at, value)
    elif kind == "truncate":
        n = len(img.data)
        cut = [0, 72, 104, cs, 2 * cs, n // 2][where % 6] if small else where % max(n, 1)
        del img.data[min(cut, n):]
    elif kind == "extend":
        img.data += bytes(where % (2 * MiB) if small else cs)
    elif kind == "flip":
        if img.data:
            img.data[where % len(img.data)] ^= (value & 0xFF) or 1


# --------------------------------------------------------------------------- the oracle

def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def exercise(data: bytes, workdir: str, stats: dict[str, int]) -> None:
    stats["examples"] += 1
    path = os.path.join(workdir, "img.qcow2")
    with open(path, "wb") as f:
        f.write(data)
    target = os.path.join(workdir, "out.raw")
    before = file_digest(path)
    commands = [["info", path], ["info", "--output=json", path], ["snapshot", "-l", path],
                ["check", path], ["map", "--output=json", path],
                ["convert", "-O", "raw", path, target]]
    opened = False
    for argv in commands:
        rc, out, err = run_cli(argv)
        assert "internal error" not in err, (argv, err)
        if rc == 0 and argv[0] == "info":
            opened = True
        elif argv[0] == "check":
            # check reports what it finds as qemu-img check does: a line per
            # finding on stderr, then its verdict; 1 = it could not finish,
            # 63 = the image probes as a format without checks (one line)
            assert rc in (0, 1, 2, 3, 63), (argv, rc, err)
            assert rc != 63 or len(err.strip().splitlines()) == 1, (argv, rc, err)
            assert "Traceback" not in err, (argv, err)
        else:
            # any other command's error: one line
            assert rc == 0 or len(err.strip().splitlines()) == 1, (argv, rc, err)
        if os.path.exists(target):
            os.unlink(target)
    stats["opened" if opened else "refused"] += 1
    assert file_digest(path) == before, "a read-only command wrote to the image"


def run_example(base_name, muts, stats) -> None:
    img = Image(_bases()[base_name])
    for m in muts:
        try:
            apply(img, m)
        except (struct.error, IndexError, ValueError):
            pass        # a mutation that no longer fits the (already broken) file
    with tempfile.TemporaryDirectory(prefix="qcow2-fuzz-") as workdir:
        with open(os.path.join(workdir, "base.raw"), "wb") as f:
            f.truncate(BACKING_SIZE)
        tracemalloc.start()
        try:
            with time_budget(TIME_BUDGET):
                exercise(bytes(img.data), workdir, stats)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BUDGET, f"allocation peak {peak} bytes"


# --------------------------------------------------------------------------- the corpus

def _field(off, fmt, value):
    def change(img):
        img.put(fmt, off, value)
    return change


def _snapshot_field(off, fmt, value):
    def change(img):
        img.put(fmt, img.h.snapshots_offset + off, value)
    return change


def _truncate(n):
    def change(img):
        del img.data[n:]
    return change


# Hand-made damage: each must be refused by every command with one line,
# under 5 s and 16 MiB, without a write.  Headers claiming big tables are
# refused before anything of that size is read (qemu's caps: L1 32 MiB,
# refcount table 8 MiB, 65536 snapshots, 1 KiB of extra data per snapshot,
# header and extensions within the first cluster).
CORPUS = {
    "l1-over-cap": _field(36, "I", (32 << 20) // 8 + 1),
    "refcount-table-over-cap": _field(56, "I", 0xFFFFFFFF),
    "snapshots-over-cap": _field(60, "I", 65537),
    "header-length-over-cluster": _field(100, "I", 1 << 20),
    "header-length-short": _field(100, "I", 100),
    "extension-length-huge": _field(112 + 4, "I", 0xFFFFFFFF),
    "backing-name-huge": ("backed", _field(16, "I", 0xFFFFFFFF)),
    "backing-offset-past-cluster": _field(8, "Q", 1 << 40),
    "cluster-bits-22": _field(20, "I", 22),
    "cluster-bits-8": _field(20, "I", 8),
    "version-4": _field(4, "I", 4),
    "version-1": _field(4, "I", 1),
    "refcount-order-7": _field(96, "I", 7),
    "unknown-incompatible-bit": _field(72, "Q", 1 << 40),
    "compression-type-2": _field(104, "B", 2),
    "l1-offset-unaligned": _field(40, "Q", 0x30001),
    "size-needs-bigger-l1": _field(24, "Q", 1 << 62),
    "encrypted": _field(32, "I", 1),
    "snapshot-extra-over-cap": _snapshot_field(36, "I", 1025),
    "truncated-50": _truncate(50),
    "truncated-104": _truncate(104),
    # tables past the end of the file; the first was a finding: the L1 table
    # was read zero-padded (32 MiB, then a list of 4M entries)
    "l1-beyond-eof": _field(36, "I", (32 << 20) // 8),
    "refcount-table-beyond-eof": _field(56, "I", 100),
    "snapshot-table-beyond-eof": _field(60, "I", 65536),
}

def _feature_table_cut_short(img):
    # the fuzzer's first finding: a feature name table extension whose data
    # the (truncated) file does not hold was parsed past the buffer's end
    del img.data[120:]


CORPUS["feature-table-cut-short"] = _feature_table_cut_short
# the cases that were findings before the driver's fix
FINDINGS = ["l1-beyond-eof", "feature-table-cut-short"]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_corpus(qcow2_fuzz_stats, tmp_path, case):
    base, change = CORPUS[case] if isinstance(CORPUS[case], tuple) else ("v3", CORPUS[case])
    img = Image(_bases()[base])
    change(img)
    path = tmp_path / "img.qcow2"
    path.write_bytes(bytes(img.data))
    before = file_digest(path)
    target = str(tmp_path / "out.raw")
    tracemalloc.start()
    try:
        with time_budget(5):
            for argv in (["info", str(path)], ["check", str(path)],
                         ["convert", "-O", "raw", str(path), target]):
                rc, out, err = run_cli(argv)
                assert "internal error" not in err, (argv, err)
                assert rc != 0 and len(err.splitlines()) == 1, (argv, rc, err)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"allocation peak {peak} bytes"
    assert file_digest(path) == before
    assert not os.path.exists(target)
    if case in FINDINGS:
        qcow2_fuzz_stats["findings fixed"] += 1


examples = st.tuples(st.sampled_from(["v3", "v3", "v2", "extl2", "512", "zlib", "zstd",
                                      "backed"]),
                     st.lists(mutation(), min_size=1, max_size=4))


@given(examples)
def test_fuzz_qcow2(qcow2_fuzz_stats, example):
    run_example(*example, qcow2_fuzz_stats)


@pytest.mark.slow
@settings(settings.get_profile("long"))
@given(examples)
def test_fuzz_qcow2_long(qcow2_fuzz_stats, example):
    run_example(*example, qcow2_fuzz_stats)
