"""The blkdebug fault-injection filter on its own."""

from __future__ import annotations

import errno
import json
import os

import pytest

import blockdrv
from blockdrv.block import open_node, open_protocol
from blockdrv.errors import BlockIOError, InvalidArgumentError, NoSpaceError
from blockdrv.common import O_RDWR, WRITE_FUA
from blockdrv.plugins import get_registry
from blockdrv.protocols import blkdebug


@pytest.fixture
def raw(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(bytes(64 * 1024))
    return path


def _open(path, config):
    return open_protocol(path, O_RDWR, {"driver": "blkdebug", "config": config})


def test_registered_as_a_driver():
    assert "blkdebug" in get_registry().protocols


def test_passthrough_and_counters(raw):
    bs = _open(raw, {"rules": []})
    bs.pwrite(0, b"abc")
    bs.pwrite(4096, b"def")
    bs.flush()
    assert bytes(bs.pread(0, 3)) == b"abc"
    st = blkdebug.state(bs)
    assert (st.writes, st.flushes, st.counters["reads"], st.events) == (2, 1, 1, 3)
    bs.close()
    assert open(raw, "rb").read(3) == b"abc"


def test_nth_write_error_once_and_always(raw):
    bs = _open(raw, {"rules": [{"event": "write", "nth": 2, "action": "error",
                                "errno": "ENOSPC", "once": True}]})
    bs.pwrite(0, b"1")
    with pytest.raises(NoSpaceError) as exc:
        bs.pwrite(0, b"2")
    assert exc.value.errno == errno.ENOSPC
    bs.pwrite(0, b"3")                       # once: the third write passes
    bs.close()
    bs = _open(raw, {"rules": [{"event": "write", "nth": 2, "action": "error", "errno": 5}]})
    bs.pwrite(0, b"1")
    for _ in range(3):
        with pytest.raises(BlockIOError):
            bs.pwrite(0, b"2")
    assert blkdebug.state(bs).errors_injected == 3
    bs.close()


def test_range_and_flush_rules(raw):
    bs = _open(raw, {"rules": [
        {"event": "write", "offset": 8192, "length": 4096, "action": "error"},
        {"event": "flush", "nth": 2, "action": "error", "errno": "EIO", "once": True}]})
    bs.pwrite(0, bytes(8192))                # ends right before the range
    with pytest.raises(BlockIOError):
        bs.pwrite(8000, bytes(200))          # touches it
    bs.flush()
    with pytest.raises(BlockIOError):
        bs.flush()
    bs.close()                               # close's flush is flush #3: passes


def test_crash_drops_later_writes(raw):
    bs = _open(raw, {"rules": [{"event": ["write", "flush"], "nth": 3, "action": "crash"}]})
    bs.pwrite(0, b"A")
    bs.flush()
    bs.pwrite(1, b"B")                       # event 3: the crash, dropped
    bs.pwrite(2, b"C")                       # dropped, silently
    bs.flush()
    st = blkdebug.state(bs)
    assert st.crashed and st.crash_event == 3 and st.dropped == 3
    bs.close()
    assert open(raw, "rb").read(3) == b"A\0\0"


def test_crash_fail_mode(raw):
    bs = _open(raw, {"rules": [{"event": "flush", "nth": 1, "action": "crash",
                                "after_crash": "fail"}]})
    bs.pwrite(0, b"A")
    with pytest.raises(BlockIOError, match="lost power"):
        bs.flush()
    with pytest.raises(BlockIOError):
        bs.pwrite(0, b"B")
    with pytest.raises(BlockIOError):
        bs.close()                           # close flushes: the device is gone
    assert bs.closed


@pytest.mark.parametrize("unflushed, expect", [("keep", b"XYZ"), ("lose", b"X\0\0")])
def test_volatile_cache(raw, unflushed, expect):
    bs = _open(raw, {"cache": "volatile",
                     "rules": [{"event": "write", "nth": 4, "action": "crash",
                                "unflushed": unflushed}]})
    bs.pwrite(0, b"X")
    bs.flush()
    bs.pwrite(1, b"Y")
    bs.pwrite(2, b"Z")
    assert bytes(bs.pread(0, 3)) == b"XYZ"   # reads see the cache
    assert open(raw, "rb").read(3) == b"X\0\0"  # the medium does not, yet
    bs.pwrite(3, b"!")                       # crash
    bs.close()
    assert open(raw, "rb").read(4) == expect + b"\0"


def test_volatile_cache_random_subset_is_seeded(raw):
    results = set()
    for _ in range(2):
        with open(raw, "wb") as f:
            f.write(bytes(64))
        bs = _open(raw, {"rules": [{"event": "flush", "nth": 1, "action": "crash",
                                    "unflushed": "random", "seed": 11}]})
        for i in range(16):
            bs.pwrite(i, bytes([65 + i]))
        bs.flush()
        st = blkdebug.state(bs)
        assert st.kept_writes + st.lost_writes == 16
        bs.close()
        results.add(open(raw, "rb").read(16))
    assert len(results) == 1


def test_fua_write_is_durable_in_volatile_mode(raw):
    bs = _open(raw, {"cache": "volatile", "rules": [
        {"event": "flush", "nth": 1, "action": "crash", "unflushed": "lose"}]})
    bs.pwrite(0, b"old")
    bs.pwrite(0, b"new", WRITE_FUA)
    bs.pwrite(8, b"lost")
    bs.flush()
    bs.close()
    data = open(raw, "rb").read(12)
    assert data[:3] == b"new" and data[8:12] == bytes(4)


def test_config_files_and_filename(tmp_path):
    img = str(tmp_path / "d.vhdx")
    blockdrv.create_image(img, "vhdx", "8M").close()
    ini = tmp_path / "rules.ini"
    ini.write_text("# comment\n[blkdebug]\nrecord = on\n\n"
                   "[inject-error]\nevent = write\nnth = 1\nerrno = ENOSPC\nonce = on\n")
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"rules": [{"event": "write", "nth": 1, "action": "error"}]}))
    for cfg, cls in ((ini, NoSpaceError), (js, BlockIOError)):
        with pytest.raises(cls):
            with open_node(f"blkdebug:{cfg}:{img}", "vhdx", O_RDWR) as bs:
                pass                         # the open's header update is write 1
    with open_node(f"blkdebug::{img}", "vhdx", O_RDWR) as bs:
        bs.pwrite(0, b"hello")
        assert bs.file.drv.name == "blkdebug" and bs.file.file.drv.name == "file"
        assert blkdebug.state(bs).writes > 0
    with blockdrv.open_image(img) as im:
        assert im.read(0, 5) == b"hello" and im.check().corruptions == 0


def test_probe_through_filter_and_options_form(tmp_path):
    img = str(tmp_path / "d.vhdx")
    blockdrv.create_image(img, "vhdx", "8M").close()
    bs = open_node(img, None, 0, options={"file": {"driver": "blkdebug",
                                                   "config": {"rules": []}}})
    assert bs.format_name == "vhdx" and bs.file.drv.name == "blkdebug"
    bs.close()


@pytest.mark.parametrize("bad", [
    {"rules": [{"event": "scribble", "action": "error"}]},
    {"rules": [{"event": "write", "action": "explode"}]},
    {"rules": [{"event": "write", "action": "error", "nth": 0}]},
    {"rules": [{"event": "write", "action": "error", "errno": "ENOPE"}]},
    {"rules": [{"event": "write", "action": "crash", "unflushed": "some"}]},
    {"bogus": 1},
])
def test_bad_config(raw, bad):
    with pytest.raises(InvalidArgumentError):
        _open(raw, bad)


def test_bad_filename_and_missing_config(tmp_path):
    with pytest.raises(InvalidArgumentError):
        open_protocol("blkdebug:nocolon", 0)
    with pytest.raises(InvalidArgumentError):
        open_protocol(f"blkdebug:{tmp_path}/missing.ini:{tmp_path}/x", 0)
    assert not os.path.exists(tmp_path / "x")


def test_reopen_of_a_top_level_filter_reopens_its_child_once(tmp_path):
    """The generic layer walks the whole ``file`` chain on reopen, so a
    filter need not forward the transaction (doing both reopened the child
    twice and closed its new descriptor)."""
    from blockdrv.block import open_node
    from blockdrv.common import O_RDWR
    path = tmp_path / "x.img"
    path.write_bytes(b"\xab" * 4096)
    bs = open_node(f"blkdebug::{path}", "blkdebug", O_RDWR)
    try:
        bs.reopen(True)
        assert bs.read_only and bs.file.read_only
        assert bytes(bs.pread(0, 16)) == b"\xab" * 16
        bs.reopen(False)
        bs.pwrite(0, b"\xcd" * 16)
        bs.flush()
    finally:
        bs.close()
    assert path.read_bytes()[:16] == b"\xcd" * 16
