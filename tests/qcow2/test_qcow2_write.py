"""Same qemu-io script on both tools -> identical qcow2 files.

Each case makes one image with ``qemu-img create -f qcow2`` (and its backing
file, raw or qcow2, with data written by qemu-io), copies it, runs a seeded
random script (pattern writes of any size and alignment, ``write -z``,
``write -z -u``, discards, reads checked against a model, flushes) with
``qemu-io`` on one copy and ``blockdrv io`` on the other, and asserts: the
same output, byte-identical files (no masking: qcow2 has no GUIDs or
timestamps), ``qemu-img check`` clean and ``qemu-img compare`` equal.

Over cluster sizes 512 to 2M, compat 0.10 and 1.1, lazy refcounts on and
off, without a backing file and over raw and qcow2 ones; image sizes that
are not cluster multiples, so the partial last cluster's discard (qemu
discards it whole) is exercised too.
"""

from __future__ import annotations

import itertools

import pytest

from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import (qemu_img_check, run_qemu_img, run_qemu_io,
                                   random_script)

pytestmark = pytest.mark.interop

MiB = 1 << 20
CLUSTERS = (512, 4096, 65536, 2 * MiB)
LEVELS = (("0.10", False), ("1.1", False), ("1.1", True))
BACKINGS = (None, "raw", "qcow2")
CASES = list(itertools.product(CLUSTERS, LEVELS, BACKINGS))
# the default suite: every cluster size x level once, the backing kinds in
# turn; the other two thirds are slow (every metadata step is an fdatasync)
QUICK = [c for i, c in enumerate(CASES) if i % 3 == (i // 3 + i // 9) % 3]


def _id(case) -> str:
    cs, (compat, lazy), backing = case
    return f"c{cs}-{compat}{'-lazy' if lazy else ''}-{backing or 'nobacking'}"


def _template(tmp, case, size: int) -> str:
    cs, (compat, lazy), backing = case
    opts = f"cluster_size={cs},compat={compat}" + (",lazy_refcounts=on" if lazy else "")
    extra = []
    if backing:
        base = str(tmp / f"base.{backing}")
        rc, _, err = run_qemu_img("create", "-q", "-f", backing, base, str(size))
        assert rc == 0, err
        # data the overlay's copy-on-write must carry over, with holes between
        rc, out, err = run_qemu_io(base, ["write -P 0x5a 0 1M", "write -P 0x6b 3M 2M",
                                          "write -P 0x7c 9000000 3000000"], fmt=backing)
        assert rc == 0, (out, err)
        extra = ["-b", base, "-F", backing]
    path = str(tmp / "template.qcow2")
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *extra, path,
                              str(size))
    assert rc == 0, err
    return path


def _run(replay_both, tmp_path, case, seed: int, n: int, figures) -> None:
    cs = case[0]
    size = 24 * MiB + 3584
    image = _template(tmp_path, case, size)
    script = random_script(seed, size, n=n, max_len=max(3 * MiB, 2 * cs),
                           weights={"zero": 2, "discard": 1.5}, flush_every=13)
    if case[2]:
        # the model behind the script's read -P knows no backing data: read
        # plainly there, qemu-img compare checks the guest data instead
        script = [" ".join(c.split()[:1] + c.split()[3:]) if c.startswith("read -P") else c
                  for c in script]
    replay = replay_both(script, fmt="qcow2", image=image)
    replay.assert_same_output()
    assert "verification failed" not in replay.qemu.stdout
    diff = compare_files(replay.qemu_path, replay.blockdrv_path, "raw")
    figures("qcow2 write", "byte-identical scripts", tried=1, survived=int(diff is None))
    assert diff is None, str(diff)
    rc, report = qemu_img_check(replay.blockdrv_path, "qcow2")
    assert rc == 0, report
    rc, out, err = run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2",
                                replay.qemu_path, replay.blockdrv_path)
    assert rc == 0, out + err


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES], ids=[_id(c) for c in CASES])
def test_random_script_same_file(replay_both, tmp_path, case, figures):
    _run(replay_both, tmp_path, case, CASES.index(case), 40, figures)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 136))
def test_random_script_same_file_long(replay_both, tmp_path, seed, figures):
    _run(replay_both, tmp_path, CASES[seed % len(CASES)], seed, 150, figures)
