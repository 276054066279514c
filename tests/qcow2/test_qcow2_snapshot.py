"""Internal snapshots in ``info`` and ``snapshot -l``, against qemu-img 7.2
on images qemu-img made (and on snapshot entries patched to carry VM state,
long VM clocks and no icount, which qemu-img cannot make itself)."""

from __future__ import annotations

import struct
import time

import pytest

from blockdrv.cli import main
from blockdrv.drivers.qcow2.header import Header
from blockdrv.testing.qemu import run_qemu_img

pytestmark = pytest.mark.interop

ZONES = ["UTC", "Asia/Kolkata", "America/St_Johns"]


@pytest.fixture(params=ZONES)
def tz(request, monkeypatch):
    """Both tools print dates in local time: the same TZ for both."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def qemu(*args):
    rc, out, err = run_qemu_img(*args)
    assert rc == 0, err
    return out


def blockdrv(capsys, *args):
    rc = main(list(args))
    got = capsys.readouterr()
    assert rc == 0, got.err
    return got.out


def make(path, names, size="64M", opts=""):
    qemu("create", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), size)
    for name in names:
        qemu("snapshot", "-c", name, str(path))
    return path


def assert_same(capsys, path):
    for out in ("human", "json"):
        ours = blockdrv(capsys, "info", f"--output={out}", str(path))
        assert ours == qemu("info", f"--output={out}", str(path))
    listed = blockdrv(capsys, "snapshot", "-l", str(path))
    assert listed == qemu("snapshot", "-l", str(path))
    return listed


CASES = {
    "one": ["s1"],
    "several": ["s1", "second", "3rd"],
    "spaces": ["my snap", "  leading and trailing  ", "a b c d e f g h i j k l m n"],
    "long names": ["x" * 40, "y" * 300, "z" * 17],
    "unicode": ["snapshot \u00e9t\u00e9", "\u65e5\u672c", "\U0001F600"],
    "escapes": ["a/b", "x\x7fy\x01\tq\"\\", "back\\u00ab", "\\\\\u00e9"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_info_and_list(tmp_path, capsys, tz, case):
    path = make(tmp_path / "img.qcow2", CASES[case])
    listed = assert_same(capsys, path)
    assert listed.startswith("Snapshot list:\n") and listed.count("\n") == len(CASES[case]) + 2


def test_v2_image(tmp_path, capsys, tz):
    assert_same(capsys, make(tmp_path / "v2.qcow2", ["old", "style"], opts="compat=0.10"))


def test_many_snapshots(tmp_path, capsys):
    path = make(tmp_path / "many.qcow2", [f"snap{i}" for i in range(60)], size="1M")
    assert len(assert_same(capsys, path).splitlines()) == 62


def test_no_snapshots(tmp_path, capsys):
    path = make(tmp_path / "none.qcow2", [])
    assert assert_same(capsys, path) == ""
    assert "Snapshot list" not in blockdrv(capsys, "info", str(path))


def _patch(path, fields):
    """Rewrite each entry's fixed fields in place: ``fields[i]`` maps
    date_sec / date_nsec / vm_clock / vm_state / icount to new values."""
    with open(path, "r+b") as f:
        h = Header.parse(f.read(1 << 21))
        pos = h.snapshots_offset
        for change in fields:
            f.seek(pos)
            entry = bytearray(f.read(40))
            id_len, name_len = struct.unpack_from(">HH", entry, 12)
            extra_len = struct.unpack_from(">I", entry, 36)[0]
            f.seek(pos + 40)
            extra = bytearray(f.read(extra_len))
            if "date_sec" in change:
                struct.pack_into(">I", entry, 16, change["date_sec"])
            if "date_nsec" in change:
                struct.pack_into(">I", entry, 20, change["date_nsec"])
            if "vm_clock" in change:
                struct.pack_into(">Q", entry, 24, change["vm_clock"])
            if "vm_state" in change:
                struct.pack_into(">I", entry, 32, change["vm_state"] & 0xFFFFFFFF
                                 if change["vm_state"] < 1 << 32 else 0)
                struct.pack_into(">Q", extra, 0, change["vm_state"])
            if "icount" in change:
                struct.pack_into(">q", extra, 16, change["icount"])
            f.seek(pos)
            f.write(entry + extra)
            end = pos + 40 + extra_len + id_len + name_len
            pos = end + (-end % 8)


def test_patched_fields(tmp_path, capsys, tz):
    path = make(tmp_path / "p.qcow2", ["a", "b", "c", "d", "e"])
    _patch(path, [
        {"vm_clock": 123 * 3600 * 10**9 + 4 * 60 * 10**9 + 5 * 10**9 + 678_900_000,
         "vm_state": 5 << 30, "icount": -1},
        {"vm_clock": 59 * 10**9 + 999_999_999, "vm_state": 1234567, "icount": 42,
         "date_sec": 0, "date_nsec": 999_999_999},
        {"vm_clock": 10**13, "vm_state": 999, "icount": 1 << 40, "date_sec": 2**32 - 1},
        {"vm_state": 1000, "date_sec": 1_000_000_000},
        {"vm_clock": 2**63 - 1, "vm_state": (1 << 62) + 1, "icount": 7},
    ])
    assert_same(capsys, path)


def test_write_actions_refused(tmp_path, capsys):
    path = make(tmp_path / "img.qcow2", ["s1"])
    before = path.read_bytes()
    for flag in ("-c", "-a", "-d"):
        rc = main(["snapshot", flag, "s1", str(path)])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.splitlines()) == 1 and "not supported" in err
    assert path.read_bytes() == before
    rc = main(["snapshot", "-l", "-c", "x", str(path)])
    assert rc == 1 and "Cannot mix" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_formats_without_snapshots(tmp_path, capsys, fmt):
    path = tmp_path / f"img.{fmt}"
    qemu("create", "-f", fmt, str(path), "1M")
    assert blockdrv(capsys, "snapshot", "-l", str(path)) == ""
    assert qemu("snapshot", "-l", str(path)) == ""
