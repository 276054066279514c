"""The nbd protocol against real servers: qemu-nbd, nbdkit and ``blockdrv
nbd`` serving a VHDX and a sparse raw file byte for byte (``-f raw``), so the
format is probed over the connection; ``info``, ``map``, ``compare`` and
``convert`` over the URI equal the local file's."""

from __future__ import annotations

import filecmp
import json

import pytest

from blockdrv.testing.tools import require_tool

from .clihelp import cli, info, map_json, ok, one_line_error
from .conftest import IMAGE_SIZE, WRITES, blockdrv, free_port, run

SERVERS = ["qemu-nbd", "nbdkit", "blockdrv"]
IMAGES = ["vhdx", "raw"]


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("server", SERVERS)
def test_matrix(servers, images, tmp_path, server, image):
    """info, map, compare and convert over the URI equal the local file's."""
    local = images[image]
    uri = servers.start(server, local)
    assert info(uri) == info(local)                      # format probed over nbd
    assert info(uri)["format"] == image
    assert map_json(uri) == map_json(local)              # holes and offsets as local
    assert cli("compare", uri, local)[0] == 0
    assert cli("compare", "-f", "raw", "-F", "raw", uri, local)[0] == 0
    ok("convert", "-O", "raw", uri, str(tmp_path / "remote.raw"))
    ok("convert", "-O", "raw", local, str(tmp_path / "local.raw"))
    assert filecmp.cmp(tmp_path / "remote.raw", tmp_path / "local.raw", shallow=False)
    ok("convert", "-O", "vhdx", uri, str(tmp_path / "remote.vhdx"))
    assert cli("compare", str(tmp_path / "remote.vhdx"), local)[0] == 0


def test_vhdx_served_raw_by_qemu_nbd_probes_as_vhdx(servers, images):
    uri = servers.start("qemu-nbd", images["vhdx"], fmt="raw")
    rc, out, err = cli("info", uri)
    assert rc == 0, err
    assert "file format: vhdx" in out
    assert "disk size: unavailable" in out           # as qemu-img info over nbd
    # and qemu-img agrees with what we found over the same URI
    qemu = run([require_tool("qemu-img"), "info", "--output=json", uri]).stdout
    assert '"format": "vhdx"' in qemu


@pytest.mark.parametrize("server", ["qemu-nbd", "blockdrv"])
def test_guest_disk_export(servers, images, tmp_path, server):
    """A VHDX served as its guest disk (-f vhdx): the export is raw, its
    zeros and holes come through base:allocation, as qemu-img sees them."""
    uri = servers.start(server, images["vhdx"], fmt="vhdx")
    assert info(uri)["format"] == "raw"
    assert info(uri)["virtual-size"] == IMAGE_SIZE
    assert cli("compare", uri, images["vhdx"])[0] == 0
    assert cli("compare", uri, images["raw"])[0] == 0
    ours = map_json(uri)
    qemu = run([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri]).stdout
    assert ours == json.loads(qemu)
    ok("convert", "-O", "raw", uri, str(tmp_path / "g.raw"))
    assert cli("compare", "-f", "raw", "-F", "raw", str(tmp_path / "g.raw"),
               images["raw"])[0] == 0
    if server == "blockdrv":
        # blockdrv nbd reports the VHDX's real allocation: its holes stay holes
        assert [(e["start"], e["length"], e["zero"], e["data"]) for e in ours] == \
               [(e["start"], e["length"], e["zero"], e["data"])
                for e in map_json(images["vhdx"])]


def test_map_shows_holes(servers, images):
    uri = servers.start("qemu-nbd", images["raw"])
    extents = map_json(uri)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    holes = [e for e in extents if not e["data"]]
    assert holes and all(e["zero"] for e in holes)
    covered = sum(n for _, n in data)
    assert covered < IMAGE_SIZE // 4
    for off, n, _ in WRITES:
        assert any(s <= off and off + n <= s + ln for s, ln in data)


def test_tcp_and_legacy_syntax(servers, images):
    uri = servers.start("nbdkit", images["vhdx"], tcp=True, name="disk")
    assert uri.startswith("nbd://127.0.0.1:")
    port = uri.split(":")[2].split("/")[0]
    assert info(uri)["format"] == "vhdx"
    assert info(f"nbd:127.0.0.1:{port}:exportname=disk")["format"] == "vhdx"
    assert info(f"nbd+tcp://127.0.0.1:{port}/disk")["format"] == "vhdx"
    usock = servers.start("qemu-nbd", images["vhdx"], name="x")
    path = usock.split("socket=")[1]
    assert info(f"nbd:unix:{path}:exportname=x")["format"] == "vhdx"


def test_writes_to_a_writable_export(servers, images, tmp_path):
    """convert -n into nbdkit's memory plugin (sparse), io writes, flush,
    write-zeroes and discard; the server keeps what was written."""
    uri = servers.start("nbdkit-memory", str(IMAGE_SIZE), readonly=False)
    ok("convert", "-n", "-f", "raw", "-O", "raw", images["raw"], uri)
    assert cli("compare", "-f", "raw", "-F", "raw", uri, images["raw"])[0] == 0
    ok("io", "-f", "raw", "-c", "write -P 0x77 1M 64k", "-c", "flush",
       "-c", "write -z 9M 4k", "-c", "discard 40M 1M", "-c", "read -P 0x77 1M 64k",
       "-c", "read -P 0 9M 4k", uri)
    rc, out, _ = cli("io", "-f", "raw", "-r", "-c", "read -P 0x77 1M 64k", uri)
    assert rc == 0 and "read 65536/65536" in out
    # what the memory plugin discarded/never got shows as holes
    assert any(not e["data"] for e in map_json(uri, "-f", "raw"))


def test_qemu_img_reads_what_we_wrote(servers, images, tmp_path):
    target = tmp_path / "target.raw"
    run([require_tool("qemu-img"), "create", "-q", "-f", "raw", str(target), str(IMAGE_SIZE)])
    uri = servers.start("qemu-nbd", str(target), readonly=False)
    ok("convert", "-n", "-O", "raw", images["vhdx"], uri)
    assert cli("compare", "-f", "raw", "-F", "raw", str(target), images["raw"])[0] == 0


def test_read_only_export_refuses_writers(servers, images):
    uri = servers.start("qemu-nbd", images["raw"], readonly=True)
    one_line_error(["io", "-f", "raw", "-c", "write 0 512", uri], "export is read-only")
    one_line_error(["convert", "-n", "-f", "raw", "-O", "raw", images["raw"], uri],
                   "read-only")


def test_errors_are_one_line(servers, images, tmp_path):
    uri = servers.start("qemu-nbd", images["raw"], name="present")
    sock = uri.split("socket=")[1]
    one_line_error(["info", f"nbd+unix:///absent?socket={sock}"],
                   "Requested export 'absent' not available")
    one_line_error(["info", f"nbd+unix:///?socket={tmp_path}/nobody.sock"],
                   "Failed to connect to")
    one_line_error(["info", f"nbd://127.0.0.1:{free_port()}/"], "Connection refused")
    one_line_error(["info", "nbds+unix:///?socket=/x"], "TLS")
    one_line_error(["info", "nbd+unix:///x"], "socket=PATH")
    one_line_error(["create", "-f", "raw", f"nbd+unix:///?socket={sock}", "1M"],
                   "cannot create")


def test_tls_required_by_the_server(servers, images, tmp_path):
    # nbdkit --tls=require with PSK: no certificates to make
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:0123456789abcdef0123456789abcdef\n")
    uri = servers.start("nbdkit", images["raw"],
                        extra=("--tls=require", f"--tls-psk={psk}"))
    one_line_error(["info", uri], "requires TLS")


def test_no_locks_taken(servers, images):
    """A remote node takes no locks: two writers of one export coexist (the
    server owns the image)."""
    import blockdrv
    uri = servers.start("nbdkit-memory", "1M", readonly=False)
    a = blockdrv.open_image(uri, fmt="raw", readonly=False)
    b = blockdrv.open_image(uri, fmt="raw", readonly=False)
    try:
        a.write(0, b"a" * 512)
        b.write(512, b"b" * 512)
        assert a.read(0, 1024) == b"a" * 512 + b"b" * 512
    finally:
        a.close()
        b.close()


def test_subprocess_cli(servers, images):
    """The installed command line (entry points) finds the protocol."""
    uri = servers.start("blockdrv", images["vhdx"])
    res = blockdrv("info", uri)
    assert "file format: vhdx" in res.stdout
