"""A hostile client costs its own connection only: garbage at every phase,
truncated headers, oversize lengths, bad magic, requests before GO.  After
each attack a well-behaved client still gets correct data from the same
(persistent) server, and the image is clean at the end."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from blockdrv.exports.nbd import protocol as P

from .conftest import PATTERN_WRITES, assert_clean, make_image
from .nbdclient import Client

pytestmark = pytest.mark.interop


def _healthy(sock: str) -> None:
    with Client(sock) as c:
        c.connect(meta=["base:allocation"])
        off, n, pat = PATTERN_WRITES[1]
        assert c.read(off, n).data == bytes([pat]) * n
        assert c.write(off, bytes([pat]) * 4096).error == 0
        assert c.block_status(0, 4096)
        c.disconnect()


def _attack(sock: str, stage: str, payload: bytes) -> None:
    try:
        with Client(sock, timeout=5) as c:
            if stage in ("options", "transmission"):
                c.greet()
            if stage == "transmission":
                c.connect_done = c.go("")
            c.send(payload)
            c.sock.shutdown(socket.SHUT_WR)
            c.closed_by_server(5)
    except (OSError, EOFError):
        pass


def _cases(rng: random.Random):
    req = lambda cmd, off=0, n=0, flags=0, magic=P.REQUEST_MAGIC: P.REQUEST.pack(  # noqa
        magic, flags, cmd, 7, off, n)
    yield "greeting", os.urandom(3)                        # short client flags
    yield "greeting", b"\xff\xff\xff\xff"                   # unknown client flags
    yield "options", struct.pack(">QII", 0xDEADBEEF, 7, 0)  # bad option magic
    yield "options", P.OPTION.pack(P.IHAVEOPT, P.OPT_GO, 0xFFFFFFF0)   # huge option
    yield "options", P.OPTION.pack(P.IHAVEOPT, P.OPT_GO, 20)[:-3]      # truncated
    yield "options", P.OPTION.pack(P.IHAVEOPT, P.OPT_GO, 6) + b"\xff" * 6
    yield "options", P.OPTION.pack(P.IHAVEOPT, P.OPT_SET_META_CONTEXT, 12) + b"\xff" * 12
    yield "options", req(P.CMD_READ, 0, 512)               # request before GO
    yield "options", req(P.CMD_WRITE, 0, 1 << 31) + os.urandom(100)
    yield "transmission", req(P.CMD_READ, magic=0x12345678)
    yield "transmission", req(P.CMD_READ)[:13]             # truncated header
    yield "transmission", req(P.CMD_WRITE, 0, 0xFFFFFFFF) + os.urandom(4096)
    yield "transmission", req(P.CMD_WRITE, 1 << 62, 512) + bytes(512)
    yield "transmission", req(P.CMD_READ, (1 << 64) - 1, 0xFFFFFFFF)
    yield "transmission", req(P.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF, 0xFFFF)
    yield "transmission", req(P.CMD_TRIM, (1 << 64) - 512, 512)
    yield "transmission", b"".join(req(rng.randrange(0, 12), rng.getrandbits(64),
                                       rng.getrandbits(32) & 0xFFFFF, rng.getrandbits(16))
                                   for _ in range(50))
    for _ in range(12):
        stage = rng.choice(["greeting", "options", "transmission"])
        yield stage, os.urandom(rng.randrange(1, 3000))


def test_fuzz_clients(tmp_path, nbd_server):
    image, fmt = make_image(tmp_path, "dynamic")
    srv = nbd_server(image, "-f", fmt, "-t", "-e", "0")
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for i, (stage, payload) in enumerate(_cases(rng)):
        _attack(srv.sock, stage, payload)
        assert srv.proc.poll() is None, f"case {i} ({stage}) killed the server"
        if i % 5 == 0:
            _healthy(srv.sock)
    _healthy(srv.sock)
    assert srv.stop() == 0
    log = srv.stderr()
    assert "internal error" not in log, log
    assert "Traceback" not in log, log
    assert_clean(image, fmt)


def test_stalled_handshake_is_dropped(tmp_path, nbd_server, monkeypatch):
    """-e 1: a client that connects and says nothing does not keep the slot
    forever (handshake timeout), and a second client gets in afterwards."""
    image, fmt = make_image(tmp_path, "raw")
    monkeypatch.setenv("BLOCKDRV_NBD_HANDSHAKE_TIMEOUT", "1")
    srv = nbd_server(image, "-f", fmt, "-t")
    with Client(srv.sock) as idle:
        idle.recv(P.GREETING.size)
        assert idle.closed_by_server(10)
    _healthy(srv.sock)
    assert srv.stop() == 0


def test_client_that_never_reads(tmp_path, nbd_server):
    """A client pipelining reads but never reading replies is throttled (its
    in-flight budget) and does not keep SIGTERM from closing the image."""
    import time
    image, fmt = make_image(tmp_path, "dynamic")
    srv = nbd_server(image, "-f", fmt, "-t", "-e", "0")
    c = Client(srv.sock, timeout=2)
    c.connect()
    sent = 0
    try:
        for i in range(200000):
            c.request(P.CMD_READ, 0, 1 << 20)
            sent += 1
    except (socket.timeout, TimeoutError):
        pass                                  # the server stopped reading us
    assert sent < 200000
    _healthy(srv.sock)                        # others are still served
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 15
    c.close()
    m = [int(x) for x in __import__("re").findall(r"max (\d+) in flight", srv.stderr())]
    assert m and max(m) <= 64, srv.stderr()
    assert_clean(image, fmt)
