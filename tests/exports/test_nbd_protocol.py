"""The NBD protocol as the standard defines it, byte by byte, with the test
client in :mod:`.nbdclient`: handshake options, transmission commands and
their flags, errors, limits, pipelining."""

from __future__ import annotations

import re
import struct
import threading

import pytest

from blockdrv.exports.nbd import protocol as P

from .conftest import IMAGE_SIZE, MiB, PATTERN_WRITES, assert_clean, make_image, reference
from .nbdclient import Client

pytestmark = pytest.mark.interop


@pytest.fixture
def vhdx(tmp_path, nbd_server):
    image, fmt = make_image(tmp_path, "dynamic")
    srv = nbd_server(image, "-f", fmt, "-t", "-A", "-D", "a test disk", name="disk")
    yield srv
    assert srv.stop() == 0
    assert_clean(image, fmt)


def test_handshake_options(vhdx):
    with Client(vhdx.sock) as c:
        assert c.greet() == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        (rtype, data), (ack, _) = c.opt_replies(P.OPT_LIST)
        assert (rtype, ack) == (P.REP_SERVER, P.REP_ACK)
        n = P.U32.unpack(data[:4])[0]
        assert data[4:4 + n] == b"disk" and data[4 + n:] == b"a test disk"
        assert c.opt_replies(P.OPT_LIST, b"x")[-1][0] == P.REP_ERR_INVALID
        assert c.opt_replies(99)[-1][0] == P.REP_ERR_UNSUP
        assert c.opt_replies(P.OPT_STARTTLS)[-1][0] == P.REP_ERR_POLICY
        assert c.opt_replies(P.OPT_STRUCTURED_REPLY, b"x")[-1][0] == P.REP_ERR_INVALID
        # meta contexts need structured replies first
        assert c.set_meta(["base:allocation"], "disk")[-1][0] == P.REP_ERR_INVALID
        rtype, info = c.go("nope")
        assert rtype == P.REP_ERR_UNKNOWN and not info
        rtype, info = c.go("disk", [P.INFO_NAME, P.INFO_DESCRIPTION], opt=P.OPT_INFO)
        assert rtype == P.REP_ACK
        assert info[P.INFO_NAME] == b"disk" and info[P.INFO_DESCRIPTION] == b"a test disk"
        assert struct.unpack(">III", info[P.INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
        assert c.size == IMAGE_SIZE
        assert c.flags & P.FLAG_SEND_WRITE_ZEROES and not c.flags & P.FLAG_READ_ONLY
        assert not c.flags & P.FLAG_CAN_MULTI_CONN      # writable: no multi-conn
        assert not c.flags & P.FLAG_SEND_DF             # no structured replies yet
        assert c.structured_reply() == P.REP_ACK
        listed = c.opt_replies(P.OPT_LIST_META_CONTEXT, c.meta_data("disk", []))
        names = [d[4:].decode() for t, d in listed if t == P.REP_META_CONTEXT]
        assert names == ["base:allocation", "qemu:allocation-depth"]
        listed = c.opt_replies(P.OPT_LIST_META_CONTEXT, c.meta_data("disk", ["base:",
                                                                             "x-y:z"]))
        assert [d[4:] for t, d in listed if t == P.REP_META_CONTEXT] == [b"base:allocation"]
        bad = c.meta_data("disk", ["base:allocation"])[:-3]     # query runs past the end
        assert c.opt_replies(P.OPT_SET_META_CONTEXT, bad)[-1][0] == P.REP_ERR_INVALID
        c.set_meta(["base:allocation"], "disk")
        assert list(c.contexts.values()) == ["base:allocation"]
        rtype, _ = c.go("disk")
        assert rtype == P.REP_ACK and c.flags & P.FLAG_SEND_DF
        st = c.block_status(0, IMAGE_SIZE)
        assert list(st) == ["base:allocation"]
        c.disconnect()


def test_abort_and_export_name(vhdx):
    with Client(vhdx.sock) as c:
        c.greet()
        assert c.opt_replies(P.OPT_ABORT)[-1][0] == P.REP_ACK
        assert c.closed_by_server()
    # NBD_OPT_EXPORT_NAME, with and without the 124 zero bytes
    for flags, pad in ((P.FLAG_C_FIXED_NEWSTYLE, 124),
                       (P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0)):
        with Client(vhdx.sock) as c:
            c.greet(flags)
            c.option(P.OPT_EXPORT_NAME, b"disk")
            size, tflags = struct.unpack(">QH", c.recv(10))
            assert size == IMAGE_SIZE and tflags & P.FLAG_HAS_FLAGS
            assert c.recv(pad) == bytes(pad)
            r = c.read(0, 4096)
            assert r.error == 0 and r.data == b"\x5a" * 4096
            c.disconnect()
    # an unknown name there can only be answered by hanging up
    with Client(vhdx.sock) as c:
        c.greet()
        c.option(P.OPT_EXPORT_NAME, b"nope")
        assert c.closed_by_server()
    with Client(vhdx.sock) as c:                      # unknown client flags
        c.greet(1 << 7)
        assert c.closed_by_server()


@pytest.mark.parametrize("structured", [False, True])
def test_commands_and_errors(vhdx, structured):
    with Client(vhdx.sock) as c:
        c.connect("disk", structured=structured)
        off, n, pat = PATTERN_WRITES[1]
        r = c.read(off, n)
        assert r.error == 0 and r.data == bytes([pat]) * n
        assert c.write(7 * MiB + 3, b"abc" * 1000, flags=P.CMD_FLAG_FUA).error == 0
        assert c.read(7 * MiB + 3, 3000).data == b"abc" * 1000
        assert c.cmd(P.CMD_FLUSH).error == 0
        assert c.cmd(P.CMD_CACHE, 0, 2 * MiB).error == 0
        assert c.read(IMAGE_SIZE - 512, 1024).error == P.EINVAL
        assert c.write(IMAGE_SIZE - 512, bytes(1024)).error == P.ENOSPC
        assert c.cmd(42).error == P.EINVAL                      # unknown command
        assert c.cmd(P.CMD_FLUSH, flags=P.CMD_FLAG_REQ_ONE).error == P.EINVAL
        assert c.cmd(P.CMD_BLOCK_STATUS, 0, 4096).error == P.EINVAL   # no context
        # too big: a read with simple replies, a write (its payload is read
        # past, the connection survives)
        if not structured:
            assert c.read(0, 33 * MiB).error == P.EINVAL
        r = c.write(0, bytes(33 * MiB))
        assert r.error == P.EINVAL
        # VHDX cannot zero cheaply: FAST_ZERO fails fast and changes nothing
        r = c.cmd(P.CMD_WRITE_ZEROES, 0, MiB, P.CMD_FLAG_FAST_ZERO)
        assert r.error == P.ENOTSUP
        assert c.read(0, MiB).data == b"\x5a" * MiB
        assert c.cmd(P.CMD_WRITE_ZEROES, 0, 4096, P.CMD_FLAG_NO_HOLE).error == 0
        assert c.read(0, 8192).data == bytes(4096) + b"\x5a" * 4096
        assert c.cmd(P.CMD_TRIM, 0, 4096).error == 0
        if structured:
            assert r.message                                     # errors say why
        c.disconnect()


def test_read_only_export(tmp_path, nbd_server):
    image, fmt = make_image(tmp_path, "fixed")
    srv = nbd_server(image, "-f", fmt, "-r", "-e", "2")
    with Client(srv.sock) as c:
        c.connect()
        ro = P.FLAG_READ_ONLY | P.FLAG_CAN_MULTI_CONN
        assert c.flags & ro == ro and not c.flags & P.FLAG_SEND_TRIM
        assert c.write(0, b"x" * 512).error == P.EPERM
        assert c.cmd(P.CMD_WRITE_ZEROES, 0, 512).error == P.EPERM
        assert c.cmd(P.CMD_TRIM, 0, 512).error == P.EPERM
        assert c.read(0, 512).data == b"\x5a" * 512
        c.disconnect()
    assert srv.stop() == 0


def test_raw_zero_trim_and_big_reads(tmp_path, nbd_server):
    """Raw over a file: FAST_ZERO works, TRIM punches holes only with
    --discard=unmap, reads beyond the payload limit come in several chunks
    (and EOVERFLOW with DF)."""
    import blockdrv
    size = 48 * MiB
    path = tmp_path / "big.raw"
    with blockdrv.create_image(path, "raw", size) as img:
        img.write(0, b"\x42" * size)
    for discard, holes in (("ignore", False), ("unmap", True)):
        srv = nbd_server(path, "-f", "raw", "--discard", discard)
        with Client(srv.sock) as c:
            c.connect(meta=["base:allocation"])
            assert c.cmd(P.CMD_WRITE_ZEROES, MiB, MiB, P.CMD_FLAG_FAST_ZERO).error == 0
            assert c.read(MiB, MiB).data == bytes(MiB)
            assert c.cmd(P.CMD_TRIM, 4 * MiB, MiB).error == 0
            (length, flags), = c.block_status(4 * MiB, MiB, P.CMD_FLAG_REQ_ONE)[
                "base:allocation"]
            assert length == MiB
            assert bool(flags & P.STATE_HOLE) == holes
            r = c.read(0, 40 * MiB)
            assert r.error == 0 and len(r.chunks) > 1
            assert r.data[:MiB] == b"\x42" * MiB and r.data[MiB:2 * MiB] == bytes(MiB)
            assert c.read(0, 40 * MiB, P.CMD_FLAG_DF).error == P.EOVERFLOW
            c.disconnect()
        assert srv.proc.wait(20) == 0       # not persistent: exits after its client


def test_pipelined_requests(vhdx):
    """Many requests in flight on one connection, replies matched by cookie."""
    ref = {}
    with Client(vhdx.sock) as c:
        c.connect("disk")
        cookies = {}
        requests = []
        for i in range(200):
            off = (i * 131072) % (IMAGE_SIZE - 65536)
            if i % 3 == 0:
                data = bytes([i % 251]) * 65536
                requests.append((i + 1, P.CMD_WRITE, off, data))
                ref[off] = data
            else:
                requests.append((i + 1, P.CMD_READ, off, b""))
            cookies[i + 1] = off

        def send_all():         # a real client sends while it reads replies
            for cookie, cmd, off, data in requests:
                c.request(cmd, off, 65536, data=data, cookie=cookie)
        sender = threading.Thread(target=send_all)
        sender.start()
        seen = set()
        for _ in range(200):
            r = c.reply(65536)
            assert r.error == 0 and r.cookie in cookies and r.cookie not in seen
            seen.add(r.cookie)
        sender.join()
        for off, data in ref.items():
            assert c.read(off, 65536).data == data
        c.disconnect()
    assert vhdx.stop() == 0
    m = re.findall(r"max (\d+) in flight", vhdx.stderr())
    assert m and max(map(int, m)) > 1, vhdx.stderr()
