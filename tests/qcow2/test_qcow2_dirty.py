"""Dirty qcow2 images (lazy refcounts, the writer killed before a clean
close) are repaired on a read-write open, as qemu 7.2's qcow2 open does.

Each dirty image is made the way it happens: ``qemu-io`` (``sigraise 9``)
or a blockdrv process killed with SIGKILL after writes on a
``lazy_refcounts=on`` image.  One copy is then written with ``qemu-io``,
another with ``blockdrv io``: the same output on both sides (the repair's
lines on stderr included), byte-identical files, ``qemu-img check`` clean,
the data of before the crash and of the new write both there.  A read-only
open reads without repairing; ``check`` without ``-r`` reports what qemu-img
check reports and changes nothing; ``check -r all`` repairs as qemu-img.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys

import pytest

from blockdrv.testing.qcow2_damage import Damage
from blockdrv.testing.qemu import qemu_img_check, run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20

# name -> (create options, size, writes before the kill)
CASES = {
    "64k": ("lazy_refcounts=on", "8M",
            ["write -P 0x11 0 128k", "write -P 0x12 1M 64k", "write -P 0x13 5000k 3k"]),
    "4k-refcount1": ("lazy_refcounts=on,cluster_size=4k,refcount_bits=1", "8M",
                     ["write -P 0x21 0 300k", "write -P 0x22 6M 12k"]),
    # the refcount table outgrows its cluster: the repair rebuilds the lot
    "512-many": ("lazy_refcounts=on,cluster_size=512", "64M",
                 ["write -P 0x31 0 2M", "write -P 0x32 40M 1M"]),
    "extl2": ("lazy_refcounts=on,extended_l2=on,cluster_size=32k", "8M",
              ["write -P 0x41 4k 20k", "write -P 0x42 3M 100k", "write -z 64k 64k"]),
}
NEW_WRITE = "write -P 0x5a 2600k 200k"

# a blockdrv process that writes, flushes and dies without closing
_KILLED_WRITER = """
import os, signal, sys
import blockdrv
img = blockdrv.open_image(sys.argv[1], readonly=False)
for offset, length, byte in ((0, 96 << 10, 0x61), (2 << 20, 5 << 10, 0x62)):
    img.write(offset, bytes([byte]) * length)
img.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def _incompat(path) -> int:
    with open(path, "rb") as f:
        f.seek(72)
        return int.from_bytes(f.read(8), "big")


def _qemu_dirty(tmp_path, name: str) -> tuple[str, list[str]]:
    opts, size, writes = CASES[name]
    path = str(tmp_path / f"{name}.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)[0] == 0
    rc, _, err = run_qemu_io(path, [*writes, "sigraise 9"], fmt="qcow2")
    assert rc == -signal.SIGKILL, err
    return path, writes


def _blockdrv_dirty(tmp_path) -> tuple[str, list[str]]:
    path = str(tmp_path / "killed.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path,
                        "8M")[0] == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, path], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return path, ["write -P 0x61 0 96k", "write -P 0x62 2M 5k"]


@pytest.fixture(params=[*CASES, "blockdrv-killed"])
def dirty(request, tmp_path):
    if request.param == "blockdrv-killed":
        return _blockdrv_dirty(tmp_path)
    return _qemu_dirty(tmp_path, request.param)


def _blockdrv_io(path, commands, readonly=False):
    # a process of its own: the repair's lines go to the process's stderr
    argv = [sys.executable, "-m", "blockdrv", "io", "-f", "qcow2",
            *(["-r"] if readonly else [])]
    for c in commands:
        argv += ["-c", c]
    p = subprocess.run([*argv, path], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def _timeless(out: str) -> list[str]:
    # qemu-io's timing line differs from run to run
    return [line for line in out.splitlines() if " ops; " not in line]


def _check_beside_qemu(tmp_path, capsys, path: str, repair: str):
    """``check -r repair`` by blockdrv on ``path`` and by qemu-img on a copy
    made first: (rc, captured output, qemu's (rc, out, err), the copy)."""
    from blockdrv.cli import main
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copyfile(path, theirs)
    capsys.readouterr()
    rc = main(["check", "-r", repair, path])
    cap = capsys.readouterr()
    return rc, cap, run_qemu_img("check", "-r", repair, theirs), theirs


def test_dirty_image_repaired_on_write_open(dirty, tmp_path):
    path, writes = dirty
    assert _incompat(path) & 1
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copyfile(path, ours)
    shutil.copyfile(path, theirs)
    rc, out, err = _blockdrv_io(ours, [NEW_WRITE])
    qrc, qout, qerr = run_qemu_io(theirs, [NEW_WRITE], fmt="qcow2")
    assert (rc, qrc) == (0, 0), err + qerr
    assert _timeless(out) == _timeless(qout)
    # the repair reports on stderr what qemu's does, and nothing on stdout
    assert err.splitlines() == qerr.splitlines()
    assert filecmp.cmp(ours, theirs, shallow=False)
    assert _incompat(ours) & 1 == 0
    assert qemu_img_check(ours, "qcow2")[0] == 0
    reads = [c.replace("write -z", "read -P 0").replace("write", "read") for c in writes]
    rc, out, err = run_qemu_io(ours, [*reads, NEW_WRITE.replace("write", "read")],
                               fmt="qcow2", readonly=True)
    assert rc == 0 and "Pattern verification failed" not in out + err, out + err


def test_dirty_image_read_only_open_reads_without_repair(dirty, tmp_path):
    path, writes = dirty
    before = tmp_path / "before"
    shutil.copyfile(path, before)
    reads = [c.replace("write -z", "read -P 0").replace("write", "read") for c in writes]
    rc, out, err = _blockdrv_io(path, reads, readonly=True)
    assert rc == 0 and err == "" and "Pattern verification failed" not in out, out + err
    assert filecmp.cmp(path, before, shallow=False)


def test_check_reports_dirty_image_like_qemu(dirty, tmp_path, capsys):
    from blockdrv.cli import main
    path, _ = dirty
    before = tmp_path / "before"
    shutil.copyfile(path, before)
    for output in ("human", "json"):
        capsys.readouterr()
        rc = main(["check", f"--output={output}", path])
        cap = capsys.readouterr()
        qrc, qout, qerr = run_qemu_img("check", f"--output={output}", path)
        assert (rc, cap.out, cap.err) == (qrc, qout, qerr)
    assert filecmp.cmp(path, before, shallow=False)          # nothing repaired
    rc, cap, (qrc, qout, _), theirs = _check_beside_qemu(tmp_path, capsys, path, "all")
    assert (rc, cap.out) == (qrc, qout)
    assert filecmp.cmp(path, theirs, shallow=False)


def test_check_repair_leaks_of_dirty_image_like_qemu(tmp_path, capsys):
    """``-r leaks`` cannot fix the refcounts a crash left too low: the check
    fails, and the close clears the dirty bit all the same (as qemu's)."""
    path, _ = _qemu_dirty(tmp_path, "64k")
    rc, cap, (qrc, qout, qerr), theirs = _check_beside_qemu(tmp_path, capsys, path, "leaks")
    assert (rc, cap.out) == (qrc, qout)
    assert cap.err.replace("blockdrv: ", "PROG: ") == qerr.replace("qemu-img: ", "PROG: ")
    assert filecmp.cmp(path, theirs, shallow=False)


def test_info_shows_the_dirty_bit_like_qemu(dirty, capsys):
    from blockdrv.cli import main
    path, _ = dirty
    for output in ("human", "json"):
        capsys.readouterr()
        rc = main(["info", f"--output={output}", path])
        assert (rc, capsys.readouterr().out) == run_qemu_img(
            "info", f"--output={output}", path)[:2]


def test_dirty_bit_without_damage(tmp_path):
    """A dirty bit over consistent refcounts: the repair only clears it."""
    path = str(tmp_path / "a.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path,
                        "8M")[0] == 0
    assert run_qemu_io(path, ["write -P 1 0 64k"], fmt="qcow2")[0] == 0
    Damage(path).put64(72, 1)
    theirs = str(tmp_path / "b.qcow2")
    shutil.copyfile(path, theirs)
    rc, _, err = _blockdrv_io(path, ["write -P 2 64k 4k"])
    assert rc == 0 and err == ""
    assert run_qemu_io(theirs, ["write -P 2 64k 4k"], fmt="qcow2")[0] == 0
    assert filecmp.cmp(path, theirs, shallow=False)


def test_failed_repair_refuses_the_open(tmp_path):
    """A repair that cannot finish (a reserved bit in the refcount table: the
    rebuild cannot write the new refcount block over it) refuses the open
    with qemu's line; nothing is written by the refused request."""
    path, _ = _qemu_dirty(tmp_path, "64k")
    d = Damage(path)
    pos = d.reftable_entry_pos(0)
    d.put64(pos, d.u64(pos) | 1)
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copyfile(path, theirs)
    rc, out, err = _blockdrv_io(path, [NEW_WRITE])
    qrc, qout, qerr = run_qemu_io(theirs, [NEW_WRITE], fmt="qcow2")
    assert rc == 1 and qrc != 0 and out == qout == ""
    assert "Could not repair dirty image" in err.splitlines()[-1]
    # the same lines but the program names, the open's error last
    assert (err.replace("blockdrv: ", "PROG: ").replace(path, "IMG")
            == qerr.replace("qemu-io: ", "PROG: ").replace(theirs, "IMG"))
    assert filecmp.cmp(path, theirs, shallow=False)


def test_check_repair_that_fails_like_qemu(tmp_path, capsys):
    """``check -r all`` on the same image: the check's lines, the failed
    step and "Check failed" as qemu-img prints them, the same bytes left."""
    path, _ = _qemu_dirty(tmp_path, "64k")
    d = Damage(path)
    pos = d.reftable_entry_pos(0)
    d.put64(pos, d.u64(pos) | 1)
    rc, cap, (qrc, qout, qerr), theirs = _check_beside_qemu(tmp_path, capsys, path, "all")
    assert (rc, cap.out) == (qrc, qout) and rc == 1
    assert cap.err.replace("blockdrv: ", "PROG: ") == qerr.replace("qemu-img: ", "PROG: ")
    assert filecmp.cmp(path, theirs, shallow=False)
