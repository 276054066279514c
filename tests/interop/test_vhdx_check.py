"""``check`` against qemu-img 7.2 on the same corrupted files.

Images are made by qemu-img/qemu-io, corrupted with blockdrv.testing.vhdx.corrupt,
then checked by both tools.  Where qemu detects a problem, exit code and
counts must be equal; where it does not (problems only blockdrv detects),
the test records qemu's answer so a change in either tool shows up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from blockdrv.block import open_node
from blockdrv.common import FIX_ERRORS, FIX_LEAKS, O_CHECK, O_RDWR
from blockdrv.testing.qemu import qemu_img_check, run_qemu_img, run_qemu_io
from blockdrv.testing.vhdx.corrupt import MiB, Vhdx, make_dirty_log

pytestmark = pytest.mark.interop


def our_check(path, fix=0):
    bs = open_node(path, "vhdx", O_CHECK | (O_RDWR if fix else 0))
    try:
        r = bs.check(fix)
    finally:
        bs.close()
    return r


def exit_code(r) -> int:
    """qemu-img check's exit code for a result (no check errors here)."""
    if r.check_errors:
        return 1
    if r.corruptions:
        return 2
    if r.leaks:
        return 3
    return 0


def as_json(r) -> dict:
    out = {"check-errors": r.check_errors}
    for key, value in (("corruptions", r.corruptions), ("leaks", r.leaks),
                       ("corruptions-fixed", r.corruptions_fixed),
                       ("leaks-fixed", r.leaks_fixed)):
        if value:
            out[key] = value
    return out


def qemu_json(data: dict | None) -> dict | None:
    """qemu-img check's JSON without the fields blockdrv's result lacks."""
    if data is None:
        return None
    return {k: v for k, v in data.items() if k not in ("filename", "format")}


@pytest.fixture(scope="module")
def qbase(tmp_path_factory, qemu_img, qemu_io) -> Vhdx:
    """qemu-made: 64 MiB, 1 MiB blocks, blocks 0, 3 and 5 written (at 8, 9, 10 MiB)."""
    d = tmp_path_factory.mktemp("qbase")
    path = str(d / "base.vhdx")
    assert run_qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path,
                        "64M")[0] == 0
    res = run_qemu_io(path, ["write -P 0x41 0 1M", "write -P 0x42 3M 4k",
                             "write -P 0x43 5M 512"], "vhdx")
    assert res[0] == 0, res
    v = Vhdx.load(path)
    assert [v.block(b)[1] for b in (0, 3, 5)] == [8 * MiB, 9 * MiB, 10 * MiB]
    return v


# name -> mutation; qemu detects all of these
QEMU_DETECTS = {
    "start-past-eof": lambda v: v.set_block(7, 6, 100 * MiB),
    "two-past-eof": lambda v: (v.set_block(7, 6, 100 * MiB), v.set_block(8, 6, 200 * MiB)),
    "end-past-eof": lambda v: v.truncate(10 * MiB + 4096),
    "truncated-two-blocks": lambda v: v.truncate(9 * MiB + 512),
    "offset-overflow": lambda v: v.set_block(7, 6, (1 << 64) - MiB),
    "in-log": lambda v: v.set_block(2, 6, v.log_offset),
    "in-bat": lambda v: v.set_block(2, 6, v.bat_offset),
    "in-metadata": lambda v: v.set_block(2, 6, v.metadata_offset),
    "mixed": lambda v: (v.set_block(2, 6, v.metadata_offset), v.set_block(7, 6, 100 * MiB),
                        v.set_block(11, 6, (1 << 64) - MiB)),
}

# qemu 7.2 finds nothing; blockdrv: (corruptions, leaks)
ONLY_BLOCKDRV = {
    "in-header": (lambda v: v.set_block(2, 6, 0), (1, 0)),
    "duplicate": (lambda v: v.set_block(9, 6, 8 * MiB), (1, 0)),
    "partially-present": (lambda v: v.set_block(3, 7, 9 * MiB), (1, 0)),
    "state-4": (lambda v: v.set_block(4, 4, 0), (1, 0)),
    "reserved-bits": (lambda v: v.set_bat(0, v.bat(0) | 0x800), (1, 0)),
    "region-copy-2": (lambda v: v.data.__setitem__(256 * 1024 + 500, 1), (1, 0)),
    # free space: neither tool counts it (spec 2.1); blockdrv reports its size
    "trailing-free-space": (lambda v: v.truncate(len(v.data) + 3 * MiB), (0, 0)),
}


def _make(qbase, tmp_path, name, fn):
    v = qbase.copy()
    fn(v)
    return v.save(tmp_path / f"{name}.vhdx")


@pytest.mark.parametrize("name", list(QEMU_DETECTS))
def test_same_counts_as_qemu(name, qbase, tmp_path, qemu_img):
    path = _make(qbase, tmp_path, name, QEMU_DETECTS[name])
    q_rc, q_data = qemu_img_check(path)
    assert q_rc == 2 and q_data and q_data.get("corruptions", 0) > 0, (q_rc, q_data)
    r = our_check(path)
    assert exit_code(r) == q_rc
    assert as_json(r) == qemu_json(q_data)


@pytest.mark.parametrize("name", list(QEMU_DETECTS))
def test_repair_where_qemu_cannot(name, qbase, tmp_path, qemu_img):
    """qemu -r all leaves these; blockdrv repairs them and qemu then agrees."""
    path = _make(qbase, tmp_path, name, QEMU_DETECTS[name])
    theirs = path + ".qemu"
    shutil.copyfile(path, theirs)
    q_rc, q_data = qemu_img_check(theirs, repair="all")
    assert q_rc == 2 and q_data, (q_rc, q_data)                                     # qemu repairs nothing here
    r = our_check(path, FIX_LEAKS | FIX_ERRORS)
    assert r.corruptions == 0 and r.corruptions_fixed == q_data["corruptions"]
    assert qemu_img_check(path) == (0, {"check-errors": 0, "filename": path,
                                              "format": "vhdx"})
    assert exit_code(our_check(path)) == 0


@pytest.mark.parametrize("name", list(ONLY_BLOCKDRV))
def test_problems_only_blockdrv_detects(name, qbase, tmp_path, qemu_img):
    fn, expected = ONLY_BLOCKDRV[name]
    path = _make(qbase, tmp_path, name, fn)
    q_rc, q_data = qemu_img_check(path)
    assert q_rc == 0 and q_data is not None and "corruptions" not in q_data, q_data
    r = our_check(path)
    assert (r.corruptions, r.leaks) == expected
    r = our_check(path, FIX_LEAKS | FIX_ERRORS)
    remaining = 1 if name == "partially-present" else 0
    assert r.corruptions == remaining and r.leaks == 0
    # after our repair qemu still finds nothing wrong
    assert qemu_img_check(path)[0] == 0


def test_clean_qemu_images_agree(tmp_path, qemu_img, qemu_io):
    for opts, size in (("subformat=dynamic", "64M"), ("subformat=fixed", "16M"),
                       ("subformat=fixed,block_state_zero=off", "10000000"),
                       ("block_size=1M,log_size=8M", "4G"), ("subformat=dynamic", "0")):
        path = str(tmp_path / f"clean-{len(opts)}-{size}.vhdx")
        assert run_qemu_img("create", "-q", "-f", "vhdx", "-o", opts, path, size)[0] == 0
        if size != "0":
            assert run_qemu_io(path, ["write -P 7 0 64k"], "vhdx")[0] == 0
        q_rc, q_data = qemu_img_check(path)
        r = our_check(path)
        assert (exit_code(r), as_json(r)) == (q_rc, qemu_json(q_data)) == (0, {"check-errors": 0})


def test_dirty_log_repair_matches_qemu(tmp_path, qemu_img):
    path = str(tmp_path / "dirty.vhdx")
    make_dirty_log(path, block_size="1M")
    theirs = path + ".qemu"
    shutil.copyfile(path, theirs)
    # read-only: qemu refuses to open (exit 1); blockdrv replays in memory and
    # reports the pending log -- not a corruption: the next open replays it
    q_rc, _ = qemu_img_check(theirs)
    assert q_rc == 1
    r = our_check(path)
    assert (exit_code(r), r.corruptions) == (0, 0)
    assert any("pending log" in m for m in r.messages), r.messages
    # -r all: both replay and count one fixed corruption
    q_rc, q_data = qemu_img_check(theirs, repair="all")
    r = our_check(path, FIX_LEAKS | FIX_ERRORS)
    assert (exit_code(r), as_json(r)) == (q_rc, qemu_json(q_data)) == \
        (0, {"check-errors": 0, "corruptions-fixed": 1})
    ours, qemus = Vhdx.load(path), Vhdx.load(theirs)
    assert ours.data[8 * MiB:] == qemus.data[8 * MiB:]
    assert ours.bat(0) == qemus.bat(0)


def test_cli_check_json_matches_qemu(qbase, tmp_path, qemu_img):
    for name in ("start-past-eof", "offset-overflow", "in-metadata", "end-past-eof"):
        path = _make(qbase, tmp_path, name, QEMU_DETECTS[name])
        q_rc, q_data = qemu_img_check(path)
        res = subprocess.run([sys.executable, "-m", "blockdrv", "check", "--output=json", path],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == q_rc, res
        assert json.loads(res.stdout) == q_data
