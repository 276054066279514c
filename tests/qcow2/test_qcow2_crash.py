"""Crash matrix for qcow2 writes, on the harness's engine
(:mod:`blockdrv.testing.crash`): a seeded plan of writes, discards and
flushes runs through ``blkdebug``, which cuts the power at the Nth write or
flush, keeping, losing or randomly keeping what was not flushed.  Every cut
must leave an image that

* ``qemu-img check`` finds without corruptions (leaked clusters are fine:
  refcounts are written before the L2 entries that use them, and drop only
  after the entries are gone),
* holds every write acknowledged before the last completed flush, and for
  every touched sector a version at least that new, never garbage,
* opens read-write again and takes more writes.

With lazy refcounts a cut leaves the dirty bit set and refcounts that are
stale on purpose: ``qemu-img check`` may report them, and the read-write
open repairs them as qemu's does.  There every cut must also leave an image
that one write through ``blockdrv io`` and through ``qemu-io`` (each on a
copy) turns into the same bytes, without corruptions (a few cuts leave a
leak after that write, qemu's as ours), and that is clean after blockdrv's
read-write open alone when the cut left the dirty bit set.
"""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import subprocess

import pytest

from blockdrv.testing import crash
from blockdrv.testing.qemu import QEMU_IMG, run_blockdrv_io, run_qemu_io

pytestmark = pytest.mark.interop

MiB = crash.MiB
SECTOR = 512


def qemu_checks(bs, model, what, flags):
    """The harness's ``extra_checks``: qemu-img check on the crashed image
    (leaks allowed, exit 3) before anything reopens it read-write."""
    if what != "read-only open":
        return []
    p = subprocess.run([QEMU_IMG, "check", "-U", "-f", "qcow2", bs.filename],
                       capture_output=True, text=True, timeout=60)
    if p.returncode not in (0, 3):
        return [f"qemu-img check: rc {p.returncode}: {(p.stdout + p.stderr).strip()}"]
    return []


def _qemu_check(path: str, *args: str) -> tuple[int, str]:
    p = subprocess.run([QEMU_IMG, "check", "-U", "-f", "qcow2", *args, path],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()


LAZY_WRITE = "write -P 0x7e 3580k 100k"      # over data and holes alike


def lazy_checks(bs, model, what, flags, clean=[0]):
    """``extra_checks`` of the lazy-refcounts plan: the crashed image (dirty
    or not) written once by each tool must give the same, clean file; after
    verify_image's read-write open (the repair) it must be clean as is."""
    path = bs.filename
    if what == "reopen after replay":
        rc, out = _qemu_check(path)
        return [] if rc in clean else [f"after the repair on open: qemu-img check rc {rc}: "
                                       f"{out}"]
    if what != "read-only open":
        return []
    # a cut before the dirty bit reached the file leaves leaks only, and no
    # repair on open to free them (qemu's open leaves them too)
    clean[:] = [0] if bs.get_info().is_dirty else [0, 3]
    ours, theirs = path + ".ours", path + ".theirs"
    shutil.copyfile(path, ours)
    shutil.copyfile(path, theirs)
    try:
        rc, _, err = run_blockdrv_io(ours, [LAZY_WRITE], fmt="qcow2")
        qrc, _, qerr = run_qemu_io(theirs, [LAZY_WRITE], fmt="qcow2")
        if (rc, qrc) != (0, 0):
            return [f"write after the crash: blockdrv rc {rc} {err.strip()!r}, "
                    f"qemu-io rc {qrc} {qerr.strip()!r}"]
        problems = []
        if not filecmp.cmp(ours, theirs, shallow=False):
            problems.append("repair on open + write: files differ from qemu-io's")
        # leaks only: qemu's write after its own repair leaks on some cuts too
        # (the files are the same), never a corruption
        rc, out = _qemu_check(ours)
        if rc not in (0, 3):
            problems.append(f"repair on open + write: qemu-img check rc {rc}: {out}")
        return problems
    finally:
        os.unlink(ours)
        os.unlink(theirs)


def plan_discards(seed: int, cluster: int) -> crash.Plan:
    """Writes over a 4 MiB disk with whole-cluster discards between them
    (a discard reads back as zeros on a v3 image without backing file)."""
    rng = random.Random(seed)
    size = 4 * MiB
    ops, tag = [], 1
    for i in range(12):
        if rng.random() < 0.3:
            start = rng.randrange(0, size // cluster) * cluster
            n = rng.randint(1, 4) * cluster
            ops.append(("d", start, min(n, size - start)))
        else:
            nsec = rng.randint(1, 160)
            off = rng.randrange(0, size - nsec * SECTOR + 1, SECTOR)
            ops.append(("w", off, crash._pattern(rng, tag, nsec * SECTOR)))
            tag += 1
        if rng.random() < 0.4:
            ops.append(("f",))
    ops.append(("f",))
    return crash.Plan(f"qcow2 discards ({cluster // 1024}k clusters)", size,
                      {"cluster_size": cluster}, ops, fmt="qcow2", block_size=cluster,
                      open_options={"discard": "unmap"})


def _plans():
    return [
        crash.plan_alloc(1, fmt="qcow2", create={"cluster_size": 65536}, size=8 * MiB,
                         writes=8, name="qcow2 allocating writes (64k clusters)"),
        crash.plan_overwrite(2, fmt="qcow2", create={"cluster_size": 4096,
                                                     "compat": "0.10"},
                             name="qcow2 v2 overwrites (4k clusters)"),
        plan_discards(3, 16384),
        crash.plan_alloc(4, fmt="qcow2", create={"cluster_size": 4096,
                                                 "lazy_refcounts": True},
                         size=4 * MiB, writes=8,
                         name="qcow2 lazy refcounts (4k clusters)"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_crash_matrix(scratch, figures, qemu_img, index):
    plan = _plans()[index]
    lazy = plan.create.get("lazy_refcounts")
    crash.run_matrix(scratch, plan, crash.every_cut, crash.rotate_modes, figures,
                     extra_checks=lazy_checks if lazy else qemu_checks,
                     section="qcow2 crash")
