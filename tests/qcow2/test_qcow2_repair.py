"""Repairs (-r leaks, -r all) of damaged qcow2 images against qemu-img check
-r 7.2 on a copy of the same file: the same counters and lines, then both
files clean, the same guest data, and the same bytes.

blockdrv's qcow2 driver does not open images read-write yet, so the repair
is driven through the check module on the file's protocol node opened
read-write (the seam the driver's check hook will use)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest

from blockdrv.block import open_protocol
from blockdrv.cli.check import check_dict
from blockdrv.common import O_RDWR
from blockdrv.drivers.qcow2.check import CheckFailed, check_file
from blockdrv.engines.check import CheckReport, repair_flags
from blockdrv.errors import BlockDriverError
from blockdrv.testing.qcow2_damage import Damage
from blockdrv.testing.qemu import run_qemu_img

from test_qcow2_check import DAMAGE, damaged

pytestmark = pytest.mark.interop


def _repair(path: str, mode: str):
    f = open_protocol(path, O_RDWR)
    f.growable = True          # as under a format node: metadata may grow the file
    try:
        first, second = check_file(f, repair_flags(mode))
    finally:
        f.close()
    return CheckReport(first, second)


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("name", list(DAMAGE))
def test_repair_like_qemu(tmp_path, name, mode):
    path = damaged(tmp_path, name)
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copyfile(path, theirs)
    rc, out, err = run_qemu_img("check", "--output=json", "-r", mode, theirs)
    theirs_said = [ln for ln in err.splitlines() if ln and not ln.startswith("qemu-img:")]
    if "Could not open" in err:
        with pytest.raises(BlockDriverError):
            _repair(path, mode)
        return
    if rc == 1 and not out:
        # qemu gave up ("Check failed: Input/output error"), before any write
        with pytest.raises(CheckFailed) as failed:
            _repair(path, mode)
        assert failed.value.result.messages == theirs_said
        assert "Check failed: Input/output error" in err
        assert filecmp.cmp(path, theirs, shallow=False)
        return
    report = _repair(path, mode)
    ours = check_dict(report.result, theirs, "qcow2")
    if report.second is not None:
        ours.update({k: ours.pop(k) for k in ("leaks-fixed", "corruptions-fixed")
                     if k in ours})
    assert ours == json.loads(out), err
    said = report.first.messages + (report.second.messages if report.second else [])
    assert said == theirs_said
    # both files now check alike, read alike and are the same bytes
    after = run_qemu_img("check", theirs)
    assert run_qemu_img("check", path)[:2] == after[:2]
    if after[0] == 0:
        assert run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2", path, theirs)[0] == 0
    assert filecmp.cmp(path, theirs, shallow=False)


def test_refblock_far_beyond_the_end_rebuilds(tmp_path):
    """qemu grows the file up to a refcount block named far past its end (or
    rebuilds the structure when the file system refuses); blockdrv rebuilds
    rather than make a file of terabytes.  Both leave a clean image with the
    same data."""
    path = damaged(tmp_path, "leak")
    d = Damage(path)
    d.put64(d.reftable_entry_pos(3), 1 << 50)
    before = os.path.getsize(path)
    report = _repair(path, "all")
    assert report.result.corruptions == report.result.leaks == 0
    assert report.first.corruptions_fixed >= 1
    assert os.path.getsize(path) < before + (1 << 20)
    assert run_qemu_img("check", path)[0] == 0
