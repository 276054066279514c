"""What a differencing VHDX's parent locator may name, and what it may not.

A locator path is a plain file path: never a protocol string, never a FIFO,
a character device, a socket or a directory.  Each bad case ends in one
clear line and a non-zero exit, never a hang: the CLI runs in a subprocess
with a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

import blockdrv
from blockdrv import block
from blockdrv.drivers.vhdx import parent as vparent

MiB = 1 << 20
TIMEOUT = 30          # seconds; every command here finishes in well under one
PATTERN = bytes(range(256)) * (MiB // 256)


def make_base(path):
    with blockdrv.create_image(path, "vhdx", "4M", block_size="1M") as img:
        img.write(0, PATTERN)
    return path


def make_child(monkeypatch, child, parent, **entries):
    """A child of ``parent`` whose locator entries are overridden by
    ``entries`` (None removes one)."""
    build = vparent.build_locator

    def rewritten(child_path, parent_path, guid):
        loc = build(child_path, parent_path, guid)
        for key, value in entries.items():
            if value is None:
                loc.entries.pop(key, None)
            else:
                loc.entries[key] = value
        return loc

    with monkeypatch.context() as m:
        m.setattr(vparent, "build_locator", rewritten)
        # block.create, not create_image: the child is not opened afterwards
        block.create(os.fspath(child), "vhdx",
                     {"backing_file": os.fspath(parent), "backing_fmt": "vhdx"})
    return child


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blockdrv", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)


def commands(image, tmp_path):
    return {
        "info": ["info", image],
        "check": ["check", image],
        "io": ["io", "-c", "read 0 512", image],
        "convert": ["convert", "-O", "raw", image, tmp_path / "out.raw"],
    }


def assert_one_line_error(res, *words):
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ------------------------------------------------------------ special files

@pytest.mark.parametrize("command", ["info", "check", "io", "convert"])
def test_fifo_given_directly_is_refused_without_hanging(tmp_path, command):
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    res = cli(*commands(fifo, tmp_path)[command])
    assert_one_line_error(res, "FIFO")
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("command", ["check", "io", "convert", "info"])
def test_fifo_parent_is_refused_without_hanging(tmp_path, command):
    base = make_base(tmp_path / "base.vhdx")
    child = tmp_path / "child.vhdx"
    blockdrv.create_image(child, "vhdx", backing_file="base.vhdx").close()
    os.unlink(base)
    os.mkfifo(base)                      # the locator now names a FIFO
    res = cli(*commands(child, tmp_path)[command])
    if command == "info":
        # info names the parent without opening it (as qemu-img info does)
        assert res.returncode == 0, res.stderr
        assert "backing file: base.vhdx" in res.stdout
    else:
        assert_one_line_error(res, "backing file", "FIFO")


def _socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    return s


@pytest.mark.parametrize("kind,words", [
    ("directory", ["regular file"]),
    ("chardev", ["character device"]),
    ("socket", ["socket"]),
    ("dangling", ["not found"]),
])
@pytest.mark.parametrize("command", ["check", "io"])
def test_parent_of_the_wrong_kind_is_one_line(tmp_path, kind, words, command):
    base = make_base(tmp_path / "base.vhdx")
    child = tmp_path / "child.vhdx"
    blockdrv.create_image(child, "vhdx", backing_file="base.vhdx").close()
    os.unlink(base)
    sock = None
    if kind == "directory":
        os.mkdir(base)
    elif kind == "chardev":
        os.symlink("/dev/zero", base)
    elif kind == "socket":
        sock = _socket(base)
    else:
        os.symlink(tmp_path / "gone.vhdx", base)
    try:
        res = cli(*commands(child, tmp_path)[command])
    finally:
        if sock is not None:
            sock.close()
    assert_one_line_error(res, *words)


def test_char_device_given_directly_is_refused(tmp_path):
    assert_one_line_error(cli("info", "/dev/zero"), "character device")
    with pytest.raises(blockdrv.InvalidArgumentError, match="character device"):
        blockdrv.open_image("/dev/null")


# -------------------------------------------------- locator paths are plain paths

def test_relative_path_is_never_a_protocol_string(tmp_path, monkeypatch):
    """relative_path ``blkdebug::/abs/secret.vhdx`` of a child opened from its
    own directory must not open /abs/secret.vhdx through blkdebug."""
    (tmp_path / "elsewhere").mkdir()
    secret = make_base(tmp_path / "elsewhere" / "secret.vhdx")
    where = tmp_path / "child"
    where.mkdir()
    make_child(monkeypatch, where / "child.vhdx", secret,
               relative_path=f"blkdebug::{secret}", absolute_win32_path=None)
    monkeypatch.chdir(where)
    with pytest.raises(blockdrv.InvalidArgumentError, match="parent not found"):
        blockdrv.open_image("child.vhdx")
    res = cli("io", "-c", "read -v 0 16", "child.vhdx", cwd=where)
    assert_one_line_error(res, "parent not found", f"blkdebug::{secret}")

    # The same text read as a literal file name relative to the child: that
    # file (a copy of the parent) is opened, through the file protocol.
    target = where / "blkdebug::" / str(secret).lstrip("/")
    target.parent.mkdir(parents=True)
    shutil.copyfile(secret, target)
    with blockdrv.open_image("child.vhdx") as img:
        assert img.read(0, MiB) == PATTERN
        backing = img.bs.backing
        assert backing.file.drv.name == "file"
        assert os.path.samefile(backing.file.opaque.path, target)


@pytest.mark.parametrize("key", ["absolute_win32_path", "volume_path"])
@pytest.mark.parametrize("proto", ["blkdebug:", "memory:"])
def test_windows_paths_are_never_protocol_strings(tmp_path, monkeypatch, key, proto):
    secret = make_base(tmp_path / "secret.vhdx")
    entries = {"relative_path": None, "absolute_win32_path": None,
               key: f"{proto}:{secret}"}
    make_child(monkeypatch, tmp_path / "child.vhdx", secret, **entries)
    with pytest.raises(blockdrv.InvalidArgumentError, match="parent not found"):
        blockdrv.open_image(tmp_path / "child.vhdx")


def test_backing_option_may_still_name_a_protocol(tmp_path):
    """The user's own ``backing=`` is theirs to choose: blkdebug is honoured."""
    base = make_base(tmp_path / "base.vhdx")
    blockdrv.create_image(tmp_path / "child.vhdx", "vhdx", backing_file="base.vhdx").close()
    with blockdrv.open_image(tmp_path / "child.vhdx", backing=f"blkdebug::{base}") as img:
        assert img.bs.backing.file.drv.name == "blkdebug"
        assert img.read(0, MiB) == PATTERN
