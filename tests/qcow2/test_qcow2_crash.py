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

Lazy refcounts are left out: a crash there leaves the dirty bit set, which
asks for a repair (``qemu-img check -r all``) before blockdrv writes again.
"""

from __future__ import annotations

import random
import subprocess

import pytest

from blockdrv.testing import crash
from blockdrv.testing.qemu import QEMU_IMG

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
    ]


@pytest.mark.parametrize("index", range(3))
def test_crash_matrix(scratch, figures, qemu_img, index):
    plan = _plans()[index]
    crash.run_matrix(scratch, plan, crash.every_cut, crash.rotate_modes, figures,
                     extra_checks=qemu_checks, section="qcow2 crash")
