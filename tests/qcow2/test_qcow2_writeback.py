"""qcow2 metadata caches in writeback mode.

Changed L2 entries and refcount blocks wait in memory until a flush, a
close or too many are dirty (qemu's qcow2-cache.c).  Checked here:

* the same seeded scripts under ``-t writeback`` on both tools give
  byte-identical, clean files (the default suite's scripts run writethrough);
* the number of file flushes of a writeback session does not grow with the
  number of allocating writes, while writethrough flushes after every one;
* reads see cached changes before they reach the file, a flush makes them
  visible to qemu-io, and tables written back early (a small dirty bound)
  or evicted from the L2 cache while dirty end in the same file as qemu's.
"""

from __future__ import annotations

import shutil

import pytest

from blockdrv import api
from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import (qemu_img_check, random_script, run_blockdrv_io,
                                   run_qemu_img, run_qemu_io)

pytestmark = pytest.mark.interop

MiB = 1 << 20
WRITEBACK = ["-t", "writeback"]


def _create(path, opts: str, size: int | str) -> str:
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(path), str(size))
    assert rc == 0, err
    return str(path)


def _same_file(template: str, tmp_path, script, extra=WRITEBACK) -> None:
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copyfile(template, ours)
    shutil.copyfile(template, theirs)
    rq = run_qemu_io(theirs, script, fmt="qcow2", extra=extra)
    rb = run_blockdrv_io(ours, script, fmt="qcow2", extra=extra)
    assert rq[0] == rb[0] == 0, (rq, rb)
    assert "verification failed" not in rb[1] + rq[1]
    diff = compare_files(theirs, ours, "raw")
    assert diff is None, str(diff)
    rc, report = qemu_img_check(ours, "qcow2")
    assert rc == 0, report


@pytest.mark.parametrize("opts", [
    "cluster_size=512", "cluster_size=4k,compat=0.10", "cluster_size=64k",
    "cluster_size=64k,lazy_refcounts=on", "cluster_size=16k,extended_l2=on",
    "cluster_size=1k,refcount_bits=1"])
def test_writeback_scripts_same_file(tmp_path, opts):
    size = 24 * MiB + 3584
    template = _create(tmp_path / "t.qcow2", opts, size)
    seed = sum(map(ord, opts))
    script = random_script(seed, size, n=60, max_len=3 * MiB,
                           weights={"zero": 2, "discard": 1.5}, flush_every=17,
                           out_of_range=0)
    _same_file(template, tmp_path, script)


def _file_flushes(path: str, n: int, writethrough: bool, monkeypatch) -> int:
    """File-node flushes of one session: ``n`` allocating 64 KiB writes at
    scattered offsets of a 1 GiB image, then close."""
    from blockdrv.node import BlockDriverState
    count = [0]
    real = BlockDriverState.co_flush

    async def counting(self):
        if self.file is None:           # the protocol node
            count[0] += 1
        await real(self)
    with monkeypatch.context() as m:
        m.setattr(BlockDriverState, "co_flush", counting)
        with api.open_image(path, "qcow2", readonly=False) as img:
            for i in range(n):
                img.write(i * 7919 % 1000 * MiB, bytes([i % 200 + 1]) * (64 << 10))
                if writethrough:
                    img.flush()
    return count[0]


def test_writeback_flushes_do_not_grow_with_writes(tmp_path, monkeypatch):
    few, many = [], []
    for n, out in ((8, few), (64, many)):
        for wt in (False, True):
            path = _create(tmp_path / f"f{n}{wt}.qcow2", "cluster_size=64k", "1G")
            out.append(_file_flushes(path, n, wt, monkeypatch))
    assert few[0] == many[0], (few, many)         # writeback: a constant
    assert many[1] >= 64 > many[0], (few, many)   # writethrough: one per request at least


def test_cached_changes_read_back_and_flush_publishes(tmp_path):
    path = _create(tmp_path / "c.qcow2", "cluster_size=64k", "64M")
    with api.open_image(path, "qcow2", readonly=False) as img:
        img.write(5 * MiB, b"\x33" * 4096)
        assert img.read(5 * MiB, 4096) == b"\x33" * 4096
        img.flush()
        rc, out, err = run_qemu_io(path, ["read -P 0x33 5M 4k"], fmt="qcow2",
                                   extra=["-U", "-r"])
        assert rc == 0 and "verification failed" not in out, (out, err)


@pytest.mark.parametrize("bound", [0, 3])
def test_early_writeback_and_evicted_dirty_tables_same_file(tmp_path, monkeypatch, bound):
    """512-byte clusters: every 32 KiB of guest data has its own L2 table, so
    a script over 8 MiB dirties hundreds of tables; with a tiny dirty bound
    and L2 cache they are written back early and evicted while dirty."""
    from blockdrv.drivers.qcow2 import image, write
    monkeypatch.setattr(image, "L2_CACHE_BYTES", 2048)
    real_init = write.Qcow2Writer.__init__

    def small(self, *a, **k):
        real_init(self, *a, **k)
        self.max_dirty = bound if bound else 10 ** 9   # 0: never early, only evicted
    monkeypatch.setattr(write.Qcow2Writer, "__init__", small)
    template = _create(tmp_path / "t.qcow2", "cluster_size=512", 8 * MiB)
    # tables made and emptied by qemu-io first (a session of blockdrv's reads
    # them then); then the first table changed, more tables than the cache
    # holds, the first table again and reads of it, all before any flush
    emptied = str(tmp_path / "emptied.qcow2")
    shutil.copyfile(template, emptied)
    rc, out, err = run_qemu_io(emptied, ["write -P 9 0 4M", "discard 0 4M"], fmt="qcow2")
    assert rc == 0, (out, err)
    fixed = ["write -P 1 0 512", "write -P 2 1M 320k", "write -P 3 1k 512",
             "read -P 1 0 512", "read -P 3 1k 512", "discard 0 512", "write -P 4 2M 320k",
             "read -P 3 1k 512", "read -P 0 0 512", "flush"]
    (tmp_path / "fixed").mkdir()
    _same_file(emptied, tmp_path / "fixed", fixed)
    script = random_script(bound + 7, 8 * MiB, n=80, max_len=256 << 10,
                           weights={"zero": 1, "discard": 1}, flush_every=23,
                           out_of_range=0)
    _same_file(template, tmp_path, script)
