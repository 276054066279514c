"""A conformance suite every format driver can join (fsspec's abstract tests
and qemu-iotests' ``_supported_fmt`` are the models).

A driver joins with one subclass in its test package; pytest collects the
inherited tests, once per subclass (one subclass per variant of the format)::

    from blockdrv.testing.format_conformance import FormatConformance

    class TestQcow2(FormatConformance):
        format = "qcow2"
        create_options = {"cluster_size": "64k"}

What a subclass may say (class attributes):

``format``, ``create_options``
    the format name and the options of ``blockdrv.create_image``.
``size``, ``cluster_size``
    the virtual size of the images of the semantics tests, and the
    allocation unit the workloads straddle (writes crossing its boundaries).
``discard_zeroes``
    True: discarded ranges read as zeros; False: they keep their data; None
    (default): every discarded byte reads as its old value or as zero.
``fresh_reads_zero``
    a new image reads as zeros (False for a differencing variant over a
    parent holding data).
``variant_name``
    the variant's name in figures and messages (default: the class name).
``fuzz_examples``, ``fuzz_seed``
    the size of the default fuzz campaign (``@pytest.mark.slow``: 20 times).

and hooks (methods):

``make_image(path, size, **options)``
    create the image (default: :func:`blockdrv.create_image`); a
    differencing variant creates a parent holding data, then the child.
``crash_plans()``
    the crash-matrix workloads (:mod:`blockdrv.testing.crash`), default an
    allocating one and an overwriting one over ``create_options``.
``crash_checks(bs, model, what, flags) -> [problems]``
    the format's own post-crash checks (VHDX: no BAT entry for an unwritten
    block, log replayed by a read-write open).
``verify_allocation(bs, clusters)``
    after the concurrency runs: the format's allocation is consistent with
    the ``cluster_size`` units written (VHDX: no block allocated twice).
``fuzz_regions(path) -> [(start, end)]``
    where the fuzzer mutates (default: the first MiB and the last 64 KiB).

The tests (all through :mod:`blockdrv.api` or the node, against a shadow
``bytearray`` of what the guest must read):

* ``test_create_size_and_fresh_content`` -- the size asked for; a fresh image
  reads as zeros (or as its initial content).
* ``test_read_after_write[aligned|unaligned]`` -- seeded writes, aligned to
  4 KiB or at odd offsets and lengths, some crossing a cluster boundary, the
  last byte: reads match the shadow, also after close and reopen.
* ``test_write_zeroes[unmap|no-unmap]`` -- zero writes over data (whole
  clusters, partial, unaligned; over a parent's data too) read as zeros,
  the rest is untouched.
* ``test_discard`` -- discarded bytes read per ``discard_zeroes``, bytes
  outside the discarded ranges keep their data, also after reopen.
* ``test_flush_is_durable`` -- data written and flushed survives a process
  that dies without closing (:func:`blockdrv.testing.crash.abandon`).
* ``test_block_status`` -- the guest's block status (backing chain
  included) covers the disk contiguously; ranges reported ZERO read as
  zeros; every non-zero byte lies in a DATA range.
* ``test_reopen_ro_rw`` -- read-write -> read-only refuses writes and keeps
  the data; back to read-write takes writes; close and reopen persists.
* ``test_readonly_open_writes_nothing`` -- a read-only open, full read and
  close leave every file of the image (and its parent) byte for byte as is.
* ``test_out_of_range_requests_fail`` -- requests past the end are refused
  with a BlockDriverError.
* ``test_crash_matrix[plan]`` -- every write/flush boundary of each crash
  plan through ``blkdebug``, the three crash modes rotating (``-m slow``:
  every mode at every cut): the image opens, checks clean, every write
  acknowledged before the last completed flush reads back, no sector holds
  garbage (:func:`blockdrv.testing.crash.verify_image`);
  ``test_crash_matrix_catches_a_lost_flush`` shows the checker fails a
  driver whose flushes never reach the disk.
* ``test_concurrent_disjoint_writers``, ``test_concurrent_overlapping[seed]``
  -- coroutine writers and readers through a ``blkdebug`` filter with
  ``suspend`` on (requests really interleave): every sector ends as one
  writer's (some serial order), no reader sees a torn sector, check clean,
  ``verify_allocation``.
* ``test_fuzz_mutated_images`` -- a seeded campaign over mutated copies of
  an image with data: refused with a BlockDriverError, or opened and
  readable (and, on a copy, writable); never another exception, never a
  write to the file on a refusal or a read-only open.

The crash-matrix, concurrency and fuzz figures go to the terminal summary
("reliability figures") through the ``figures`` fixture.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct

import numpy as np
import pytest

import blockdrv

from ..block import open_node
from ..common import BLOCK_DATA, BLOCK_ZERO, O_RDWR
from ..errors import BlockDriverError
from ..iov import IOVector
from . import crash
from .budget import time_budget
from .compare import file_digest
from .crash import abandon

KiB, MiB = 1 << 10, 1 << 20
SEC = 4096                       # the concurrency tests' unit: one writer per 4 KiB


class FormatConformance:
    """Inherit, set ``format`` (and ``create_options``); see the module docstring."""

    format: str = ""
    create_options: dict = {}
    size: int = 16 * MiB
    cluster_size: int = MiB
    discard_zeroes: bool | None = None
    fresh_reads_zero: bool = True
    fuzz_examples: int = 16
    fuzz_seed: int | None = None
    fuzz_time_budget: float = 20.0
    variant_name: str = ""

    # -- hooks ----------------------------------------------------------------------

    def make_image(self, path: str, size: int, **options) -> None:
        """Create the image at ``path`` (the test's directory may hold more
        files, e.g. a parent; a copy of ``path`` in that directory must work)."""
        blockdrv.create_image(path, self.format, size, **options).close()

    def crash_plans(self) -> list[crash.Plan]:
        return [crash.plan_alloc(1, fmt=self.format, create=dict(self.create_options),
                                 name=f"{self.variant}: allocating writes"),
                crash.plan_overwrite(2, fmt=self.format, create=dict(self.create_options),
                                     name=f"{self.variant}: overwrites")]

    def crash_checks(self, bs, model, what: str, flags: int) -> list[str]:
        return []

    def verify_allocation(self, bs, clusters: set[int]) -> None:
        """``clusters``: the ``cluster_size`` units the concurrency run wrote."""

    def fuzz_regions(self, path: str) -> list[tuple[int, int]]:
        n = os.path.getsize(path)
        return [(0, min(n, MiB)), (max(0, n - 64 * KiB), n)]

    @property
    def variant(self) -> str:
        """The name in figures and failures: ``variant_name``, else the class's."""
        name = type(self).__name__
        return self.variant_name or (name[4:] if name.startswith("Test") else name)

    # -- helpers ----------------------------------------------------------------------

    @pytest.fixture
    def new_image(self, tmp_path):
        """``new_image(size=None, name="img") -> path`` of a fresh image."""
        counter = [0]

        def factory(size: int | None = None, name: str = "img") -> str:
            counter[0] += 1
            path = str(tmp_path / f"{name}{counter[0]}.{self.format}")
            self.make_image(path, size or self.size, **self.create_options)
            return path

        return factory

    def open(self, path, readonly: bool = True):
        return blockdrv.open_image(path, self.format, readonly=readonly)

    def content(self, img) -> bytearray:
        return bytearray(img.read(0, img.size))

    def assert_content(self, img, shadow, what: str = "") -> None:
        got = img.read(0, img.size)
        if got != shadow:
            a = np.frombuffer(bytes(got), dtype=np.uint8)
            b = np.frombuffer(bytes(shadow), dtype=np.uint8)
            bad = np.flatnonzero(a != b)
            pytest.fail(f"{self.variant}{what}: {len(bad)} bytes differ from the shadow, "
                        f"first at {int(bad[0]):#x}: read {a[bad[0]]:#04x}, "
                        f"expected {b[bad[0]]:#04x}")

    def _workload(self, rng, size, aligned: bool, count: int = 40):
        cs = self.cluster_size
        for i in range(count):
            kind = rng.random()
            if kind < 0.3:                               # crosses a cluster boundary
                edge = rng.randrange(cs, size, cs) if size > cs else size // 2
                back = rng.randrange(1, 16 * KiB)
                off = max(0, edge - back)
                n = min(back + rng.randrange(1, 16 * KiB), size - off)
            else:
                off = rng.randrange(0, size)
                n = min(rng.randrange(1, 64 * KiB), size - off)
            if aligned:
                off = off // 4096 * 4096
                n = max(4096, n // 4096 * 4096)
                n = min(n, size - off)
            yield off, n, bytes([i % 251 + 1]) * 7 + rng.randbytes(max(0, n - 7))

    # -- semantics --------------------------------------------------------------------

    def test_create_size_and_fresh_content(self, new_image):
        path = new_image()
        with self.open(path) as img:
            assert img.size == self.size
            assert img.format == self.format
            if self.fresh_reads_zero:
                assert img.read(0, img.size) == bytes(self.size)

    @pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
    def test_read_after_write(self, new_image, aligned):
        path = new_image()
        rng = random.Random(11 + aligned)
        with self.open(path, readonly=False) as img:
            shadow = self.content(img)
            for off, n, data in self._workload(rng, img.size, aligned):
                img.write(off, data[:n])
                shadow[off:off + n] = data[:n]
                assert img.read(off, n) == data[:n], f"read-after-write at {off:#x}+{n}"
            img.write(img.size - 1, b"\xee")                  # the last byte
            shadow[-1] = 0xEE
            self.assert_content(img, shadow, " before close")
        with self.open(path) as img:
            self.assert_content(img, shadow, " after reopen")

    @pytest.mark.parametrize("unmap", [False, True], ids=["no-unmap", "unmap"])
    def test_write_zeroes(self, new_image, unmap):
        path = new_image()
        cs, rng = self.cluster_size, random.Random(21)
        with self.open(path, readonly=False) as img:
            shadow = self.content(img)
            data = rng.randbytes(3 * cs)
            img.write(cs, data)                             # clusters 1..3 hold data
            shadow[cs:4 * cs] = data
            zeros = [(cs, cs),                              # a whole cluster
                     (2 * cs + 4096, 8192),                 # aligned, inside one
                     (3 * cs - 700, 1400),                  # unaligned, across a boundary
                     (3 * cs + 1, 3),                       # sub-sector
                     (5 * cs, cs),                          # never written (a parent's data)
                     (img.size - cs // 2, cs // 2)]         # the end of the disk
            for off, n in zeros:
                img.write_zeroes(off, n, unmap=unmap)
                shadow[off:off + n] = bytes(n)
                assert img.read(off, n) == bytes(n), f"zero write at {off:#x}+{n} reads data"
            self.assert_content(img, shadow)
        with self.open(path) as img:
            self.assert_content(img, shadow, " after reopen")

    def test_discard(self, new_image):
        path = new_image()
        cs, rng = self.cluster_size, random.Random(31)
        with self.open(path, readonly=False) as img:
            before = self.content(img)
            data = rng.randbytes(4 * cs)
            img.write(0, data)
            before[:4 * cs] = data
            img.flush()
            ranges = [(cs, cs), (2 * cs + 512, 4096), (3 * cs - 1000, 3000),
                      (img.size - cs, cs)]
            for off, n in ranges:
                img.discard(off, n)
            img.flush()
            after = self.content(img)
        with self.open(path) as img:
            reopened = self.content(img)
        for what, got in (("", after), (" after reopen", reopened)):
            a = np.frombuffer(bytes(got), dtype=np.uint8)
            b = np.frombuffer(bytes(before), dtype=np.uint8)
            inside = np.zeros(len(b), dtype=bool)
            for off, n in ranges:
                inside[off:off + n] = True
            changed = np.flatnonzero((a != b) & ~inside)
            assert not len(changed), \
                f"discard changed bytes outside its ranges{what}, first at {int(changed[0]):#x}"
            if self.discard_zeroes is True:
                bad = np.flatnonzero(inside & (a != 0))
            elif self.discard_zeroes is False:
                bad = np.flatnonzero(inside & (a != b))
            else:
                bad = np.flatnonzero(inside & (a != b) & (a != 0))
            assert not len(bad), (f"discarded byte at {int(bad[0]):#x}{what} reads "
                                  f"{a[bad[0]]:#04x}, neither zero nor its old value")

    def test_flush_is_durable(self, new_image):
        path = new_image()
        rng = random.Random(41)
        img = self.open(path, readonly=False)
        shadow = self.content(img)
        for off, n, data in self._workload(rng, img.size, aligned=False, count=12):
            img.write(off, data[:n])
            shadow[off:off + n] = data[:n]
        img.flush()
        abandon(img.bs)                                   # the process dies here
        with self.open(path, readonly=False) as img:      # (a log is replayed)
            self.assert_content(img, shadow, " after a crash following a flush")

    def test_block_status(self, new_image):
        path = new_image()
        cs, rng = self.cluster_size, random.Random(51)
        with self.open(path, readonly=False) as img:
            img.write(cs + 4096, rng.randbytes(8192))
            img.write(3 * cs - 512, rng.randbytes(1024))
            img.write(4 * cs, bytes(cs))                      # data that is zeros
            img.write_zeroes(6 * cs, cs, unmap=True)
            img.write(7 * cs, rng.randbytes(cs))
            img.discard(7 * cs, cs // 2)
            img.flush()
        with self.open(path) as img:
            content = np.frombuffer(bytes(img.read(0, img.size)), dtype=np.uint8)
            pos, seen = 0, []
            while pos < img.size:
                st = img.block_status(pos, img.size - pos)
                assert 0 < st.pnum <= img.size - pos, f"pnum {st.pnum} at {pos:#x}"
                chunk = content[pos:pos + st.pnum]
                if st.flags & BLOCK_ZERO:
                    nz = np.flatnonzero(chunk)
                    assert not len(nz), (f"{pos:#x}+{st.pnum:#x} reported ZERO, reads "
                                         f"non-zero at {pos + int(nz[0]):#x}")
                elif not st.flags & BLOCK_DATA:
                    nz = np.flatnonzero(chunk)
                    assert not len(nz), (f"non-zero byte at {pos + int(nz[0]):#x} outside "
                                         f"any DATA range (flags {st.flags:#x})")
                seen.append((pos, st.pnum, st.flags))
                pos += st.pnum
            assert pos == img.size

    def test_reopen_ro_rw(self, new_image):
        path = new_image()
        with self.open(path, readonly=False) as img:
            img.write(4096, b"A" * 8192)
            img.bs.reopen(read_only=True)
            assert img.readonly
            with pytest.raises(BlockDriverError):
                img.write(0, b"B" * 512)
            assert img.read(4096, 8192) == b"A" * 8192
            img.bs.reopen(read_only=False)
            img.write(self.cluster_size, b"C" * 512)
            assert img.read(self.cluster_size, 512) == b"C" * 512
        with self.open(path) as img:
            assert img.read(4096, 8192) == b"A" * 8192
            assert img.read(self.cluster_size, 512) == b"C" * 512

    def test_readonly_open_writes_nothing(self, new_image, tmp_path):
        path = new_image()
        with self.open(path, readonly=False) as img:
            img.write(12345, b"x" * 5000)
        files = sorted(p for p in tmp_path.iterdir() if p.is_file())
        before = {p: file_digest(p, mtime=True) for p in files}
        with self.open(path) as img:
            img.read(0, img.size)
            img.block_status(0, img.size)
            img.info()
        assert {p: file_digest(p, mtime=True) for p in files} == before

    def test_out_of_range_requests_fail(self, new_image):
        path = new_image()
        with self.open(path, readonly=False) as img:
            for call in (lambda: img.read(img.size - 512, 1024),
                         lambda: img.write(img.size - 512, b"x" * 1024),
                         lambda: img.write(img.size, b"x"),
                         lambda: img.write_zeroes(img.size - 512, 1024)):
                with pytest.raises(BlockDriverError):
                    call()
            assert img.read(img.size - 512, 512) == img.read(img.size - 512, 512)

    # -- the crash matrix -------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        if "crash_plan" in metafunc.fixturenames:
            plans = self.crash_plans()
            metafunc.parametrize("crash_plan", plans, ids=[p.name.split(": ", 1)[-1]
                                                           .replace(" ", "-") for p in plans])

    def _matrix(self, scratch, plan, modes, figures, label=None):
        return crash.run_matrix(scratch, plan, crash.every_cut, modes, figures, label=label,
                                extra_checks=self.crash_checks, make_image=self.make_image)

    def test_crash_matrix(self, crash_plan, scratch, figures):
        self._matrix(scratch, crash_plan, crash.rotate_modes, figures)

    @pytest.mark.slow
    def test_crash_matrix_full(self, crash_plan, scratch, figures):
        self._matrix(scratch, crash_plan, crash.all_modes, figures,
                     label=crash_plan.name + " (full)")

    def test_crash_matrix_catches_a_lost_flush(self, scratch, monkeypatch):
        """The checker itself: if this format's guest flushes never reached
        the disk, the matrix must fail (writes are lost with the cache)."""
        from ..node import BlockDriverState
        real = BlockDriverState.co_flush
        fmt = self.format

        async def flush_forgotten(node):
            if node.drv.name == fmt:
                return
            await real(node)

        plan = crash.plan_overwrite(2, fmt=self.format, create=dict(self.create_options),
                                    name=f"{self.variant}: overwrites, flush forgotten")
        monkeypatch.setattr(BlockDriverState, "co_flush", flush_forgotten)
        with pytest.raises(AssertionError, match="lost a flushed write"):
            crash.run_matrix(scratch, plan, crash.every_cut, lambda n: [("lose", "drop")],
                             lambda *a, **k: None, extra_checks=self.crash_checks,
                             make_image=self.make_image)

    # -- concurrency ------------------------------------------------------------------

    @staticmethod
    def _pattern(writer: int, nsec: int) -> bytes:
        """Every 4 KiB sector starts with the writer's id and is filled with a
        writer-specific byte, so a torn sector is visible."""
        one = writer.to_bytes(4, "little") + bytes([(writer * 37 + 1) % 255 + 1]) * (SEC - 4)
        return one * nsec

    @classmethod
    def _owner(cls, sector: bytes, base: bytes) -> int | None:
        if sector == base:
            return 0
        writer = int.from_bytes(sector[:4], "little")
        return writer if sector == cls._pattern(writer, 1) else None

    def _open_suspending(self, path):
        return open_node(path, self.format, O_RDWR,
                         options={"file": {"driver": "blkdebug",
                                           "config": {"suspend": True, "rules": []}}})

    def _verify_concurrent(self, path, base, must_hold, may_hold, clusters):
        bs = open_node(path, self.format, 0)
        try:
            if bs.drv.bdrv_check is not None:
                res = bs.check()
                assert res.corruptions == 0, res.messages
            self.verify_allocation(bs, clusters)
            wrong = []
            for sector in sorted(set(must_hold) | set(may_hold)):
                got = self._owner(bytes(bs.pread(sector * SEC, SEC)), base[sector])
                if sector in must_hold and got != must_hold[sector]:
                    wrong.append((sector, got, must_hold[sector]))
                elif sector in may_hold and got not in may_hold[sector]:
                    wrong.append((sector, got, may_hold[sector]))
            assert not wrong, f"sectors not from any serial order: {wrong[:5]}"
        finally:
            bs.close()

    def _base_sectors(self, path, sectors):
        with self.open(path) as img:
            return {s: bytes(img.read(s * SEC, SEC)) for s in sectors}

    def test_concurrent_disjoint_writers(self, new_image, figures):
        """Writers to different sectors of the same unallocated clusters:
        every write landed."""
        path = new_image()
        cs, rng = self.cluster_size, random.Random(1)
        clusters = rng.sample(range(self.size // cs), min(12, self.size // cs))
        jobs, writer = [], 1
        for c in clusters:
            for slot in rng.sample(range(cs // SEC // 4), 6):      # 6 writers per cluster
                jobs.append((writer, c * cs + slot * 4 * SEC, 1 + rng.randrange(4)))
                writer += 1

        must = {off // SEC + i: w for w, off, n in jobs for i in range(n)}
        base = self._base_sectors(path, must)

        async def main(bs):
            await asyncio.gather(*(bs.co_pwrite(off, self._pattern(w, n))
                                   for w, off, n in jobs))
            await bs.co_flush()

        bs = self._open_suspending(path)
        try:
            asyncio.run(main(bs))
        finally:
            bs.close()
        self._verify_concurrent(path, base, must, {}, set(clusters))
        figures("concurrency", f"{self.variant}: disjoint writers, shared unallocated clusters",
                cases=1, writers=len(jobs))

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_concurrent_overlapping(self, new_image, seed, figures):
        """Writers hitting the same sectors (written before and not) while
        readers read them: each read sees whole patterns, each sector ends
        as one of its writers'."""
        path = new_image()
        cs, rng = self.cluster_size, random.Random(seed)
        hot = rng.sample(range(self.size // cs), 4)
        pre = hot[:2]
        with self.open(path, readonly=False) as img:
            for c in pre:
                img.write(c * cs, self._pattern(999, 8))
        sectors = [c * cs // SEC + i for c in hot for i in range(8)]
        base = self._base_sectors(path, sectors)
        jobs = []
        for w in range(1, 41):
            c = rng.choice(hot)
            start = rng.randrange(0, 8)
            jobs.append((w, c * cs + start * SEC, rng.randint(1, 8 - start)))
        torn = []

        async def reader(bs, off, n):
            for _ in range(3):
                buf = bytearray(n * SEC)
                await bs.co_preadv(off, n * SEC, IOVector.from_buffer(buf))
                for i in range(n):
                    s = off // SEC + i
                    if self._owner(bytes(buf[i * SEC:(i + 1) * SEC]), base[s]) is None:
                        torn.append(s)
                await asyncio.sleep(0)

        async def writer(bs, w, off, n):
            await bs.co_pwrite(off, self._pattern(w, n))
            if w % 7 == 0:
                await bs.co_flush()

        async def main(bs):
            tasks = [writer(bs, *j) for j in jobs]
            tasks += [reader(bs, c * cs, 8) for c in hot for _ in range(3)]
            rng.shuffle(tasks)
            await asyncio.gather(*tasks)
            await bs.co_flush()

        bs = self._open_suspending(path)
        try:
            asyncio.run(main(bs))
        finally:
            bs.close()
        assert not torn, f"readers saw torn sectors {torn[:5]}"
        may: dict[int, set] = {s: {0} for s in sectors}
        for c in pre:
            for i in range(8):
                may[c * cs // SEC + i] = {0}          # the pre-race pattern is the base
        written: set[int] = set()
        for w, off, n in jobs:
            for i in range(n):
                may[off // SEC + i].add(w)
                written.add(off // SEC + i)
        for s in written:                             # a writer always wins over the base
            may[s].discard(0)
        self._verify_concurrent(path, base, {}, may,
                                set(pre) | {off // cs for _, off, _ in jobs})
        figures("concurrency", f"{self.variant}: overlapping writers + readers",
                cases=1, writers=len(jobs), readers=12)

    # -- fuzzing ----------------------------------------------------------------------

    INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 511, 512, 4095, 4096, 65536, MiB - 1, MiB,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1,
                   (1 << 64) - 1]

    def _mutate(self, rng: random.Random, data: bytearray, regions) -> str:
        kind = rng.choice(["value", "value", "value", "flip", "flip", "truncate", "extend"])
        if kind == "truncate":
            cut = rng.choice([0, 8, 512, 64 * KiB, len(data) // 2, len(data) - 1,
                              rng.randrange(0, max(1, len(data)))])
            del data[max(0, cut):]
            return f"truncate {cut}"
        if kind == "extend":
            n = rng.choice([1, 511, 4096, MiB])
            data.extend(bytes(n))
            return f"extend +{n}"
        start, end = rng.choice(regions)
        if end <= start:
            return "none"
        at = rng.randrange(start, end)
        if kind == "flip":
            if at < len(data):
                data[at] ^= rng.randrange(1, 256)
            return f"flip {at:#x}"
        fmt = rng.choice("BHIQ")
        width = struct.calcsize("<" + fmt)
        value = rng.choice(self.INTERESTING + [rng.getrandbits(width * 8)])
        value &= (1 << (width * 8)) - 1
        at = at // width * width
        if at + width <= len(data):
            struct.pack_into("<" + fmt, data, at, value)
        return f"{fmt} {value:#x} at {at:#x}"

    def _read_sample(self, img) -> None:
        size, cs = img.size, self.cluster_size
        clusters = -(-size // cs)
        picks = sorted({*range(min(clusters, 8)), *range(max(0, clusters - 8), clusters),
                        *(i * clusters // 16 for i in range(16))})
        for c in picks:
            off = c * cs
            n = min(cs, size - off, MiB)
            try:
                img.read(off, n)
            except BlockDriverError:
                pass            # a clear error for a damaged range is a right answer

    def _fuzz_one(self, template: bytes, label: str, workdir: str, stats: dict) -> None:
        path = os.path.join(workdir, os.path.basename(self._fuzz_name))
        with open(path, "wb") as f:
            f.write(template)
        before = file_digest(path)
        try:
            with self.open(path) as img:
                stats["opened_ro"] += 1
                self._read_sample(img)
                img.info()
        except BlockDriverError:
            stats["refused_ro"] += 1
        assert file_digest(path) == before, f"{label}: a read-only open wrote to the image"
        try:
            with self.open(path, readonly=False) as img:
                stats["opened_rw"] += 1
                self._read_sample(img)
                if img.size >= 8192:
                    at = img.size // 2 // 4096 * 4096
                    try:
                        img.write(at, b"w" * 4096)
                    except BlockDriverError:
                        pass
                    else:
                        assert img.read(at, 4096) == b"w" * 4096, f"{label}: write lost"
        except BlockDriverError:
            stats["refused_rw"] += 1
            assert file_digest(path) == before, \
                f"{label}: a refused read-write open wrote to the image"

    def _fuzz(self, new_image, tmp_path, figures, examples: int, seed: int) -> None:
        path = new_image(name="fuzzbase")
        self._fuzz_name = path
        rng = random.Random(seed)
        with self.open(path, readonly=False) as img:
            for c in range(0, img.size // self.cluster_size, 3):
                img.write(c * self.cluster_size + 512, rng.randbytes(4096))
        with open(path, "rb") as f:
            template = f.read()
        regions = self.fuzz_regions(path)
        stats = dict.fromkeys(("examples", "opened_ro", "refused_ro", "opened_rw",
                               "refused_rw"), 0)
        workdir = tmp_path / "fuzz"
        workdir.mkdir()
        # the image's other files (a parent) stay next to the mutated copy
        for p in tmp_path.iterdir():
            if p.is_file() and str(p) != path:
                shutil.copy(p, workdir / p.name)
        for i in range(examples):
            data = bytearray(template)
            muts = [self._mutate(rng, data, regions) for _ in range(rng.randint(1, 4))]
            label = f"example {i} (seed {seed}): {', '.join(muts)}"
            stats["examples"] += 1
            with time_budget(self.fuzz_time_budget):
                try:
                    self._fuzz_one(bytes(data), label, str(workdir), stats)
                except AssertionError:
                    raise
                except BlockDriverError as exc:     # outside an expected place
                    pytest.fail(f"{label}: {type(exc).__name__} escaped: {exc}")
                except Exception as exc:            # noqa: BLE001 -- the finding
                    pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
        figures("fuzz", self.variant, **stats)

    def test_fuzz_mutated_images(self, new_image, tmp_path, figures):
        self._fuzz(new_image, tmp_path, figures, self.fuzz_examples, self._seed())

    @pytest.mark.slow
    def test_fuzz_mutated_images_long(self, new_image, tmp_path, figures):
        self._fuzz(new_image, tmp_path, figures, 20 * self.fuzz_examples, self._seed() + 1)

    def _seed(self) -> int:
        """``fuzz_seed``, else one per variant (stable across runs)."""
        import zlib
        return self.fuzz_seed if self.fuzz_seed is not None else zlib.crc32(self.variant.encode())


__all__ = ["FormatConformance"]
