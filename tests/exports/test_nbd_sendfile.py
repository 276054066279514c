"""Read replies sent from the host file (sendfile) by a read-only export:
what clients read is the image's content, on every kind of image, and the
path is taken only where the host file holds the guest's bytes."""

from __future__ import annotations

import os

import pytest

from blockdrv.block import open_node
from blockdrv.common import O_RDWR
from blockdrv.coroutine import run_sync
from blockdrv.exports.nbd.export import Export
from blockdrv.testing.tools import require_tool

from .conftest import IMAGE_SIZE, MiB, make_image, reference, run

KINDS = ["raw", "dynamic", "fixed", "4k", "diff"]


@pytest.mark.interop
@pytest.mark.parametrize("kind", KINDS)
def test_read_only_export_reads_the_image(tmp_path, nbd_server, kind):
    qemu_img = require_tool("qemu-img")
    image, fmt = make_image(tmp_path, kind)
    ref = reference(tmp_path)
    srv = nbd_server(image, "-f", fmt, "-r", "-t")
    out = tmp_path / "converted.raw"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    assert out.read_bytes() == ref.read_bytes()
    # Reads crossing data, holes and (VHDX) block boundaries, unaligned,
    # through blockdrv's own NBD client.
    import blockdrv
    data = ref.read_bytes()
    with blockdrv.open_image(srv.uri, "raw") as img:
        for off, n in ((5 * MiB - 4096, 2 * MiB), (20 * MiB - 512, 3 * MiB + 512),
                       (0, 128 << 10), (IMAGE_SIZE - MiB, MiB), (7 * MiB, 64 << 10)):
            assert img.read(off, n) == data[off:off + n], (off, n)
    res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(ref)], check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("kind", ["raw", "dynamic", "diff"])
def test_host_extents_only_for_read_only_plain_images(tmp_path, kind):
    image, fmt = make_image(tmp_path, kind)
    ref = reference(tmp_path).read_bytes()
    bs = open_node(str(image), fmt)
    try:
        exp = Export(bs)
        assert exp.send_from_host
        pieces = run_sync(exp.host_extents(4 * MiB, 20 * MiB))
        assert pieces is not None and sum(n for _, _, n in pieces) == 20 * MiB
        # the pieces hold the guest's bytes: zeros, or the host file there
        got = b"".join(bytes(n) if fd < 0 else os.pread(fd, n, at) for fd, at, n in pieces)
        assert got == ref[4 * MiB:24 * MiB]
    finally:
        bs.close()
    bs = open_node(str(image), fmt, O_RDWR)
    try:
        exp = Export(bs)
        assert not exp.send_from_host
        assert run_sync(exp.host_extents(0, MiB)) is None
    finally:
        bs.close()


def test_no_host_extents_under_a_filter(tmp_path):
    image, _ = make_image(tmp_path, "raw")
    bs = open_node(f"blkdebug::{image}", "raw")
    try:
        assert not Export(bs).send_from_host
    finally:
        bs.close()


def _wmem_max() -> int:
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            return int(f.read())
    except OSError:
        return 0


def test_whole_read_reply_queued_for_a_client_not_reading(tmp_path, nbd_server):
    """On a unix socket the server's send buffer holds a 2 MiB read reply
    (as much of it as net.core.wmem_max allows): the server does not stop
    every 256 KiB until the client has drained its socket."""
    import fcntl
    import struct
    import termios
    import time

    from blockdrv.exports.nbd import protocol as P
    from blockdrv.exports.nbd.server import UNIX_SNDBUF

    from .nbdclient import Client

    image, fmt = make_image(tmp_path, "raw")
    srv = nbd_server(image, "-f", fmt, "-r")
    n = 2 * MiB
    want = min(n, UNIX_SNDBUF, _wmem_max())
    with Client(srv.sock) as c:
        c.connect()
        c.request(P.CMD_READ, 0, n)
        queued, deadline = 0, time.monotonic() + 10
        while time.monotonic() < deadline:
            queued = struct.unpack("i", fcntl.ioctl(c.sock.fileno(), termios.FIONREAD,
                                                    b"\0" * 4))[0]
            if queued >= want:
                break
            time.sleep(0.01)
        assert queued >= want, (queued, want)
        assert c.reply(n).data == reference(tmp_path).read_bytes()[:n]
        c.disconnect()
    assert srv.proc.wait(20) == 0
