"""``check`` on crashed-but-repairable images, side by side with qemu-img 7.2.

* a log entry whose LastFileOffset is near 2^48: replay grows the file only
  as far as something references (qemu: ignores a 1 MiB-aligned value, fails
  with "File too large" on an unaligned one);
* a LogGuid in the headers with no valid entry (qemu's header update landed,
  its log write failed): refused read-write, reported by ``check``, cleared by
  ``check -r all``;
* ``check -r all`` of a pending log prints exactly what qemu-img prints;
* free space nothing references is not a leak (qemu-img never reports one);
* a pending log is not a corruption for a read-only ``check``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import blockdrv
from blockdrv.testing.compare import compare_files, file_digest
from blockdrv.testing.qemu import run_qemu_img, run_qemu_io, sparse_copy
from blockdrv.testing.vhdx.corrupt import MiB, Vhdx, make_dirty_log, pend_block_allocation
from blockdrv.testing.vhdx.scripts import current_header

pytestmark = pytest.mark.interop

PENDING = "pending log that will be replayed on the next read-write open"


def blockdrv_cli(*args) -> subprocess.CompletedProcess:
    """The ``blockdrv`` command in a subprocess (exact stdout, stderr, exit code)."""
    return subprocess.run([sys.executable, "-m", "blockdrv", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def qemu_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def both(path, *args):
    """``check ARGS`` by both tools, each on its own sparse copy of ``path``:
    (ours, theirs, our copy, qemu's copy)."""
    ours, theirs = f"{path}.ours", f"{path}.qemu"
    sparse_copy(path, ours)
    sparse_copy(path, theirs)
    return blockdrv_cli("check", *args, ours), qemu_cli("check", *args, theirs), ours, theirs


def same_stdout(a, b, ours, theirs) -> bool:
    return a.stdout.replace(ours, "IMG") == b.stdout.replace(theirs, "IMG")


# ----------------------------------------------------------- 1. LastFileOffset near 2^48

def _huge_last_file_offset(path, last: int) -> dict:
    facts = make_dirty_log(path, block_size="1M")
    v = Vhdx.load(path)
    at = facts["log_entry"]
    struct.pack_into("<Q", v.data, at + 56, last)       # LastFileOffset
    v.reseal_log_entry(at)
    v.save(path)
    return facts


@pytest.mark.parametrize("last", [(1 << 48) - MiB, (1 << 48) - 4096])
def test_huge_last_file_offset_is_capped_not_grown(last, tmp_path, qemu_img):
    path = str(tmp_path / "huge.vhdx")
    facts = _huge_last_file_offset(path, last)
    size = os.path.getsize(path)
    ro = blockdrv_cli("check", path)
    assert ro.returncode == 0, ro
    assert "LastFileOffset" in ro.stderr and "Traceback" not in ro.stderr, ro
    assert os.path.getsize(path) == size
    ours, theirs, o, t = both(path, "-r", "all")
    assert ours.returncode == 0, ours
    assert "LastFileOffset" in ours.stderr and str(last) in ours.stderr, ours
    assert os.path.getsize(o) == size                   # nothing references more
    if last % MiB == 0:
        # qemu 7.2 never grows the file for an aligned LastFileOffset: same result
        assert theirs.returncode == 0 and same_stdout(ours, theirs, o, t), theirs
        assert compare_files(o, t, "vhdx") is None
    else:
        # qemu tries to grow the file to 256 TiB: ext4 refuses ("File too large")
        assert theirs.returncode == 1 or os.path.getsize(t) > (1 << 47), theirs
    assert qemu_cli("check", o).returncode == 0
    r = run_qemu_io(o, [f"read -P 0x{facts['pattern']:02x} 0 1M"], "vhdx",
                    readonly=True)
    assert r[0] == 0 and "verification failed" not in r[1], r


def test_huge_last_file_offset_read_only_open_stays_small(tmp_path):
    path = str(tmp_path / "huge-ro.vhdx")
    facts = _huge_last_file_offset(path, 1 << 48)
    with blockdrv.open_image(path) as img:
        assert img.read(0, 4096) == bytes([facts["pattern"]]) * 4096
        assert img.info().is_dirty
    with blockdrv.open_image(path, readonly=False) as img:
        assert img.read(0, 4096) == bytes([facts["pattern"]]) * 4096
    assert os.path.getsize(path) == facts["block_offset"] + facts["block_size"]


# ----------------------------------------------------------- 2. LogGuid, no entry

@pytest.fixture
def orphan_guid(tmp_path, qemu_img, qemu_io):
    """qemu-made: block 2 holds 0xcd; then an allocating write whose first log
    write fails (EIO on 512-byte sector 2048, the log at 1 MiB) after qemu set
    the LogGuid in both headers.  -> (path, digest of the guest disk)."""
    path = str(tmp_path / "orphan.vhdx")
    conf = tmp_path / "orphan.blkdebug"
    conf.write_text('[inject-error]\nevent = "pwritev"\nsector = "2048"\n'
                    'errno = "5"\nonce = "on"\n')
    assert run_qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path,
                        "64M")[0] == 0
    assert run_qemu_io(path, ["write -P 0xcd 2M 64k"], "vhdx")[0] == 0
    r = run_qemu_io(f"blkdebug:{conf}:{path}", ["write -P 0xab 0 64k"], "vhdx")
    assert "Input/output error" in r[1] + r[2], r
    assert current_header(path)[1].has_log
    return path


def test_log_guid_without_entry_reported_and_repaired(orphan_guid, qemu_img):
    path = orphan_guid
    with pytest.raises(blockdrv.CorruptImageError, match="no valid entr"):
        blockdrv.open_image(path, readonly=False)
    before = file_digest(path)
    ro = blockdrv_cli("check", path)
    assert ro.returncode == 2, ro
    assert "1 errors were found on the image." in ro.stdout
    assert "log" in ro.stderr and "-r all" in ro.stderr, ro
    ro_json = blockdrv_cli("check", "--output=json", path)
    assert ro_json.returncode == 2 and json.loads(ro_json.stdout)["corruptions"] == 1
    assert file_digest(path) == before
    fix = blockdrv_cli("check", "-r", "all", path)
    assert fix.returncode == 0, fix
    assert "    1 corruptions\n" in fix.stdout and "No errors were found" in fix.stdout
    assert "Repaired:" in fix.stderr and "log" in fix.stderr, fix
    assert not current_header(path)[1].has_log
    q = qemu_cli("check", path)
    assert q.returncode == 0 and q.stdout == "No errors were found on the image.\n", q
    r = run_qemu_io(path, ["read -P 0xcd 2M 64k", "read -P 0 0 64k"], "vhdx", readonly=True)
    assert r[0] == 0 and "verification failed" not in r[1], r
    with blockdrv.open_image(path, readonly=False) as img:   # now writable
        img.write(0, b"\xab" * 65536)
    assert qemu_cli("check", path).returncode == 0


# ----------------------------------------------------------- 3. -r all output as qemu's

def test_repair_of_pending_log_prints_what_qemu_prints(tmp_path, qemu_img):
    path = str(tmp_path / "dirty.vhdx")
    make_dirty_log(path, block_size="1M")
    for args in (("-r", "all"), ("-r", "all", "--output=json")):
        ours, theirs, o, t = both(path, *args)
        assert theirs.returncode == 0 and theirs.stderr == "", theirs
        assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr), ours
        assert same_stdout(ours, theirs, o, t), (ours.stdout, theirs.stdout)


# ----------------------------------------------------------- 4. free space is no leak

def test_free_space_after_log_replay_is_not_a_leak(tmp_path, qemu_img):
    """What qemu's iotest 070 checks on its Hyper-V sample: ``check -r all``
    replays a pending log, and the double check finds nothing, though free
    space between and after the blocks is referenced by no BAT entry."""
    path = str(tmp_path / "freespace.vhdx")
    with blockdrv.create_image(path, "vhdx", "64M", block_size="1M") as img:
        img.write(0, b"\x11" * 4096)
    v = Vhdx.load(path)
    v.truncate(len(v.data) + 3 * MiB)                   # free space between blocks ...
    v.data[-3 * MiB:-2 * MiB] = b"\x5a" * MiB           # ... not even zeros
    v.save(path)
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(7 * MiB, b"\x77" * 4096)              # a block after the free space
    facts = pend_block_allocation(path, 9, 0x99)        # a pending log
    v = Vhdx.load(path)
    v.truncate(len(v.data) + 2 * MiB)                   # free space at the end
    v.save(path)
    ours, theirs, o, t = both(path, "-r", "all")
    assert theirs.returncode == 0 and "    1 corruptions" in theirs.stdout, theirs
    assert ours.returncode == 0, ours
    assert same_stdout(ours, theirs, o, t), (ours.stdout, theirs.stdout)
    assert "leaked clusters were found" not in ours.stdout
    for args in ((), ("--output=json",)):
        a, b = blockdrv_cli("check", *args, o), qemu_cli("check", *args, o)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout) and b.returncode == 0, a
    # -r all (leaks included) reclaims the free space at the end of the file only
    assert os.path.getsize(o) == os.path.getsize(t) - 2 * MiB
    assert f"Reclaimed {2 * MiB} bytes of free space" in ours.stderr, ours.stderr
    ours = blockdrv_cli("check", o)
    assert f"{3 * MiB} bytes of free space" in ours.stderr, ours.stderr
    r = run_qemu_io(o, ["read -P 0x11 0 4k", "read -P 0x77 7M 4k",
                        f"read -P 0x{facts['pattern']:02x} 9M 1M"], "vhdx", readonly=True)
    assert r[0] == 0 and "verification failed" not in r[1], r


def test_disk2vhd_trailing_bytes_are_not_a_leak(tmp_path, qemu_img, qemu_io):
    path = str(tmp_path / "d2v.vhdx")
    assert run_qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=2M", path,
                        "64M")[0] == 0
    assert run_qemu_io(path, ["write -P 1 0 2M"], "vhdx")[0] == 0
    with open(path, "ab") as f:
        f.write(bytes(512))
    ours, theirs, o, t = both(path)
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours, theirs)
    assert same_stdout(ours, theirs, o, t), ours.stdout
    assert "512 bytes of free space" in ours.stderr, ours.stderr
    size = os.path.getsize(path)
    ours = blockdrv_cli("check", "-r", "leaks", path)
    assert ours.returncode == 0 and ours.stdout == "No errors were found on the image.\n", ours
    assert "Reclaimed 512 bytes of free space" in ours.stderr, ours.stderr
    assert os.path.getsize(path) == size - 512
    assert "free space" not in blockdrv_cli("check", path).stderr
    assert qemu_cli("check", path).returncode == 0


# ----------------------------------------------------------- 5. pending log is no corruption

def test_read_only_check_of_pending_log_is_not_a_corruption(tmp_path, qemu_img):
    path = str(tmp_path / "pending.vhdx")
    make_dirty_log(path, block_size="1M")
    before = file_digest(path)
    q = qemu_cli("check", path)
    assert q.returncode == 1 and "needs to be replayed" in q.stderr, q
    ours = blockdrv_cli("check", path)
    assert ours.returncode == 0, ours
    assert ours.stdout == "No errors were found on the image.\n"
    assert PENDING in ours.stderr and "check -r all" in ours.stderr, ours.stderr
    js = blockdrv_cli("check", "--output=json", path)
    assert js.returncode == 0 and "corruptions" not in json.loads(js.stdout)
    assert file_digest(path) == before
