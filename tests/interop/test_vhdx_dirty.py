"""qemu-made dirty logs through the whole stack: driver open, CLI info/check/io.

* read-only (beyond qemu, which refuses): the log replays in memory, reads see
  the replayed data, ``info`` says ``"dirty-flag": true`` and not one byte of
  the file changes;
* read-write / ``check -r all``: the same result as ``qemu-img check -r all``
  on a copy, byte for byte after normalization.
"""

from __future__ import annotations

import json

import pytest

import blockdrv
from blockdrv.cli import main as cli_main
from blockdrv.testing.compare import compare_files, file_digest
from blockdrv.testing.qemu import qemu_img_check, run_qemu_img, run_qemu_io, sparse_copy
from blockdrv.testing.vhdx.scripts import DIRTY_LOG_CASES, dirty_log_case

pytestmark = pytest.mark.interop


@pytest.fixture(params=list(DIRTY_LOG_CASES))
def dirty(request, tmp_path, qemu_img, qemu_io):
    """(path, offset of the 64 KiB of 0xab the pending log entry holds)."""
    return dirty_log_case(tmp_path, request.param)


def test_readonly_open_replays_in_memory_and_writes_nothing(dirty, capsys):
    path, offset = dirty
    before = file_digest(path, mtime=True)
    with blockdrv.open_image(path) as img:
        assert img.info().is_dirty
        assert img.read(offset, 65536) == b"\xab" * 65536
    assert cli_main(["info", "--output=json", path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["log-pending"] is True
    assert cli_main(["io", "-r", "-c", f"read -P 0xab {offset} 64k", path]) == 0
    assert "read 65536/65536" in capsys.readouterr().out
    # A read-only check reports the pending log (not a corruption), writing nothing.
    assert cli_main(["check", path]) == 0
    captured = capsys.readouterr()
    assert captured.out == "No errors were found on the image.\n"
    assert "pending log" in captured.err and "check -r all" in captured.err
    assert file_digest(path, mtime=True) == before


def test_check_repair_matches_qemu(dirty, qemu_img, capsys):
    path, offset = dirty
    ours, theirs = path + ".ours", path + ".qemu"
    sparse_copy(path, ours)
    sparse_copy(path, theirs)
    q_rc, q_data = qemu_img_check(theirs, "vhdx", repair="all")
    rc = cli_main(["check", "-r", "all", "--output=json", ours])
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""                   # qemu prints nothing on stderr either
    assert rc == q_rc, (out, q_data)
    assert q_data is not None
    assert json.loads(out) | {"filename": ""} == q_data | {"filename": ""}
    diff = compare_files(ours, theirs, "vhdx")
    assert diff is None, str(diff)
    # Both tools now read the replayed data from either file.
    r = run_qemu_io(ours, [f"read -P 0xab {offset} 64k"], "vhdx", readonly=True)
    assert r[0] == 0 and "read 65536/65536" in r[1] and "verification failed" not in r[1], r
    with blockdrv.open_image(theirs) as img:
        assert not img.info().is_dirty
        assert img.read(offset, 65536) == b"\xab" * 65536


def test_readwrite_open_replays(dirty):
    path, offset = dirty
    with blockdrv.open_image(path, readonly=False) as img:
        assert img.read(offset, 65536) == b"\xab" * 65536
    r = run_qemu_img("check", path)
    assert r[0] == 0, r
