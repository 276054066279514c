"""The fsspec protocol: a VHDX and a raw image over HTTP range reads (a
loopback server in a thread) and fsspec's memory filesystem read as the local
files do; it is read-only; the read-ahead window is an option."""

from __future__ import annotations

import filecmp
import importlib.util
import os

import pytest

pytest.importorskip("fsspec")

import blockdrv
from blockdrv.block import open_protocol
from blockdrv.common import O_RDWR
from blockdrv.errors import ReadOnlyError
from blockdrv.testing.conformance import ProtocolConformance

from .clihelp import cli, info, map_json, ok, one_line_error
from .conftest import free_port
from .httpserver import RangeServer


@pytest.fixture(scope="module")
def http(images):
    srv = RangeServer(os.path.dirname(images["vhdx"]))
    yield srv
    srv.close()


@pytest.mark.parametrize("image", ["vhdx", "raw"])
def test_http_matches_local(http, images, tmp_path, image):
    local = images[image]
    url = http.url(os.path.basename(local))
    assert info(url) == info(local)
    assert cli("compare", url, local)[0] == 0
    ok("convert", "-O", "raw", url, str(tmp_path / "remote.raw"))
    ok("convert", "-O", "raw", local, str(tmp_path / "local.raw"))
    assert filecmp.cmp(tmp_path / "remote.raw", tmp_path / "local.raw", shallow=False)
    assert all(r[0] in ("HEAD", "GET") for r in http.requests)
    # every body request was a range request: nothing downloads the whole file
    assert all(r[2] for r in http.requests if r[0] == "GET")


def test_http_vhdx_map_and_info(http, images):
    url = http.url("disk.vhdx")
    rc, out, err = cli("info", url)
    assert rc == 0 and "file format: vhdx" in out and "disk size: unavailable" in out
    # The format's own allocation is known; the protocol reports all data, so
    # host holes inside allocated VHDX blocks (which the local file shows)
    # are data here: every local data range lies in a remote one, and every
    # range the remote map calls unallocated is unallocated locally too.
    local, remote = map_json(images["vhdx"]), map_json(url)
    for e in local:
        if e["data"]:
            assert any(r["data"] and r["start"] <= e["start"]
                       and e["start"] + e["length"] <= r["start"] + r["length"]
                       for r in remote), e
    for r in remote:
        if not r["data"]:
            assert not any(e["data"] and e["start"] < r["start"] + r["length"]
                           and r["start"] < e["start"] + e["length"] for e in local), r
    raw = map_json(http.url("disk.raw"))
    assert len(raw) == 1 and raw[0]["data"] and not raw[0]["zero"]


def test_readahead_option(http, images):
    """A larger read-ahead window means fewer HTTP requests for the same reads."""
    def requests_for(readahead):
        before = len(http.requests)
        with blockdrv.open_image(http.url("disk.raw"), fmt="raw",
                                 file={"readahead": readahead}) as img:
            for off in range(0, 4 << 20, 64 << 10):
                img.read(off, 64 << 10)
        return len([r for r in http.requests[before:] if r[0] == "GET"])
    small, large = requests_for("64k"), requests_for("4M")
    assert small >= 32 and large <= 3, (small, large)
    with pytest.raises(blockdrv.InvalidArgumentError, match="readahead"):
        blockdrv.open_image(http.url("disk.raw"), fmt="raw", file={"readahead": "1T"})
    with pytest.raises(blockdrv.InvalidArgumentError, match="cache_type"):
        blockdrv.open_image(http.url("disk.raw"), fmt="raw", file={"cache_type": "bytes"})
    with blockdrv.open_image(http.url("disk.vhdx"), file={"cache_type": "blockcache",
                                                          "readahead": "256k"}) as img:
        assert img.read(0, 4096) == b"\x5a" * 4096


def test_read_only(http, images):
    with pytest.raises(ReadOnlyError, match="read-only"):
        open_protocol(http.url("disk.raw"), O_RDWR, {})
    one_line_error(["io", "-c", "write 0 512", http.url("disk.raw")], "read-only")
    one_line_error(["convert", "-O", "raw", images["raw"], http.url("new.raw")], "read-only")


def test_errors_are_one_line(http, images):
    one_line_error(["info", http.url("absent.vhdx")], "HTTP error 404")
    one_line_error(["info", f"http://127.0.0.1:{free_port()}/x.vhdx"], "Connection refused")
    plain = RangeServer(os.path.dirname(images["vhdx"]), ranges=False)
    try:
        one_line_error(["info", plain.url("disk.vhdx")], "range requests")
    finally:
        plain.close()


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs installed")
def test_missing_backend_named():
    one_line_error(["info", "s3://bucket/disk.vhdx"], "pip install 'blockdrv[s3]'")


@pytest.mark.skipif(importlib.util.find_spec("adlfs") is not None, reason="adlfs installed")
def test_missing_azure_backend_named():
    one_line_error(["info", "az://container/disk.vhdx"], "pip install 'blockdrv[azure]'")


def test_memory_filesystem(images, tmp_path):
    import fsspec
    mem = fsspec.filesystem("memory")
    with open(images["vhdx"], "rb") as f:
        mem.pipe("/blockdrv-test/disk.vhdx", f.read())
    try:
        url = "memory://blockdrv-test/disk.vhdx"
        assert info(url) == info(images["vhdx"])
        assert cli("compare", url, images["raw"])[0] == 0
        ok("convert", "-O", "vhdx", url, str(tmp_path / "copy.vhdx"))
        assert cli("compare", str(tmp_path / "copy.vhdx"), images["vhdx"])[0] == 0
        one_line_error(["info", "memory://blockdrv-test/absent"], "Not found")
    finally:
        mem.rm("/blockdrv-test", recursive=True)


def test_file_url(images):
    assert info("file://" + images["vhdx"]) == info(images["vhdx"])


class TestReadOnlyConformance(ProtocolConformance):
    """The protocol conformance suite's read-only subset over ``memory://``:
    images are made in fsspec's memory filesystem and opened read-only; the
    cases that write are not this protocol's."""

    protocol = "fsspec"
    supports_truncate = False

    @pytest.fixture
    def make(self, tmp_path):
        import fsspec
        mem = fsspec.filesystem("memory")
        nodes, names = [], []

        def factory(size: int = 1 << 20, data: bytes | None = None, readonly: bool = False):
            name = f"/conformance-{tmp_path.name}/img{len(names)}"
            content = (data or b"")[:size] + bytes(max(0, size - len(data or b"")))
            mem.pipe(name, content)
            names.append(name)
            node = open_protocol(f"memory://{name.lstrip('/')}", 0, {})
            nodes.append(node)
            return node

        yield factory
        for node in nodes:
            node.close()
        for name in names:
            mem.rm(name)

    # the cases that write are not this protocol's: not collected
    test_write_read_roundtrip = test_unaligned_io = test_vectored_io = None
    test_zero_length_requests = test_growable_node_extends = test_write_zeroes = None
    test_discard_keeps_other_bytes = test_flush_and_reopen_persist = None
    test_reopen_read_write_transaction = test_block_status_is_consistent = None
    test_truncate_grow_and_shrink = None

    def test_block_status_all_data(self, make):
        bs = make(size=1 << 20)
        st = bs.block_status(0, 1 << 20)
        assert st.pnum == 1 << 20 and st.flags & 1      # BLOCK_DATA

    def test_reads_content(self, make):
        payload = bytes(range(256)) * 64
        bs = make(size=1 << 20, data=payload)
        assert bytes(bs.pread(100, 5000)) == payload[100:5100]
        assert bytes(bs.pread(len(payload), 4096)) == bytes(4096)
