"""qemu-made dirty logs through the whole stack: driver open, CLI info/check/io.

* read-only (beyond qemu, which refuses): the log replays in memory, reads see
  the replayed data, ``info`` says ``"dirty-flag": true`` and not one byte of
  the file changes;
* read-write / ``check -r all``: the same result as ``qemu-img check -r all``
  on a copy, byte for byte after normalization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

import blockdrv
from blockdrv.cli import main as cli_main
from blockdrv.testing.vhdx import normalize_vhdx

from test_vhdx_log import make_dirty  # same directory (rootdir-relative imports)

pytestmark = pytest.mark.interop


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture(params=["simple", "wrapped"])
def dirty(request, tmp_path, qemu_img, qemu_io):
    if request.param == "simple":
        return make_dirty(tmp_path, qemu_img, qemu_io, "simple.vhdx", "64M", "1M",
                          ["write -P 0xab 0 64k"], 4096), 0
    writes = [f"write -P {i % 250 + 1} {i}M 4k" for i in range(129)]
    writes.append("write -P 0xab 512M 64k")
    return make_dirty(tmp_path, qemu_img, qemu_io, "wrapped.vhdx", "1G", "1M",
                      writes, 4104), 512 << 20


def test_readonly_open_replays_in_memory_and_writes_nothing(dirty, capsys):
    path, offset = dirty
    before = digest(path)
    with blockdrv.open_image(path) as img:
        assert img.info().is_dirty
        assert img.read(offset, 65536) == b"\xab" * 65536
    assert cli_main(["info", "--output=json", path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["log-pending"] is True
    assert cli_main(["io", "-r", "-c", f"read -P 0xab {offset} 64k", path]) == 0
    assert "read 65536/65536" in capsys.readouterr().out
    # A read-only check reports the pending log as a corruption, writing nothing.
    assert cli_main(["check", path]) == 2
    capsys.readouterr()
    assert digest(path) == before


def test_check_repair_matches_qemu(dirty, qemu_img, capsys):
    path, offset = dirty
    ours, theirs = path + ".ours", path + ".qemu"
    shutil.copyfile(path, ours)
    shutil.copyfile(path, theirs)
    q = subprocess.run([qemu_img, "check", "-r", "all", "--output=json", theirs],
                       capture_output=True, text=True)
    rc = cli_main(["check", "-r", "all", "--output=json", ours])
    out = capsys.readouterr().out
    assert rc == q.returncode, (out, q.stdout, q.stderr)
    assert json.loads(out) | {"filename": ""} == json.loads(q.stdout) | {"filename": ""}
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert normalize_vhdx(a.read()) == normalize_vhdx(b.read())
    # Both tools now read the replayed data from either file.
    r = subprocess.run(["qemu-io", "-f", "vhdx", "-r", "-c", f"read -P 0xab {offset} 64k",
                        ours], capture_output=True, text=True)
    assert "read 65536/65536" in r.stdout, r
    with blockdrv.open_image(theirs) as img:
        assert not img.info().is_dirty
        assert img.read(offset, 65536) == b"\xab" * 65536


def test_readwrite_open_replays(dirty):
    path, offset = dirty
    with blockdrv.open_image(path, readonly=False) as img:
        assert img.read(offset, 65536) == b"\xab" * 65536
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
