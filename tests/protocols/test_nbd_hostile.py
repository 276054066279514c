"""A server that breaks the protocol or announces absurd sizes is refused with
one line, reading no more than the bounds allow (a fake server thread on a
unix socket)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from blockdrv.exports.nbd import protocol as P

from .clihelp import one_line_error


class FakeServer:
    """Greets, answers options by ``script(option) -> bytes``, then answers
    every request with ``reply(request header) -> bytes``."""

    def __init__(self, path, script, reply=None, greeting=None) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.script, self.reply = script, reply
        self.greeting = greeting or P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT,
                                                     P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn, n):
        buf = b""
        while len(buf) < n:
            part = conn.recv(n - len(buf))
            if not part:
                raise EOFError
            buf += part
        return buf

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._session(conn)

    def _session(self, conn) -> None:
        with conn:
            try:
                conn.sendall(self.greeting)
                self._recv(conn, 4)
                while True:
                    _, opt, length = P.OPTION.unpack(self._recv(conn, P.OPTION.size))
                    self._recv(conn, length)
                    conn.sendall(self.script(opt))
                    if opt == P.OPT_GO:
                        break
                while self.reply is not None:
                    head = self._recv(conn, P.REQUEST.size)
                    conn.sendall(self.reply(P.REQUEST.unpack(head)))
            except (EOFError, OSError):
                pass

    def close(self) -> None:
        self.sock.close()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"


def read_fails(uri: str, match: str) -> None:
    import blockdrv
    with blockdrv.open_image(uri, fmt="raw") as img:
        with pytest.raises(blockdrv.BlockDriverError, match=match):
            img.read(0, 4096)
        # the connection is closed after a protocol error: later requests fail too
        with pytest.raises(blockdrv.BlockDriverError):
            img.read(0, 4096)


def go_reply(size: int, flags: int = P.FLAG_HAS_FLAGS | P.FLAG_READ_ONLY):
    def script(opt):
        if opt == P.OPT_GO:
            return (P.option_reply(opt, P.REP_INFO, P.info_export(size, flags))
                    + P.option_reply(opt, P.REP_ACK))
        if opt == P.OPT_STRUCTURED_REPLY:
            return P.option_reply(opt, P.REP_ACK)
        return P.option_reply(opt, P.REP_ERR_UNSUP)
    return script


@pytest.fixture
def fake(tmp_path):
    made = []

    def start(*args, **kw):
        srv = FakeServer(tmp_path / f"fake{len(made)}.sock", *args, **kw)
        made.append(srv)
        return srv
    yield start
    for srv in made:
        srv.close()


def test_absurd_export_size(fake):
    srv = fake(go_reply((1 << 63) + 5))
    one_line_error(["info", srv.uri], "announced an export of")


def test_huge_option_reply(fake):
    srv = fake(lambda opt: struct.pack(">QIII", P.OPT_REPLY_MAGIC, opt, P.REP_INFO, 1 << 30))
    one_line_error(["info", srv.uri], "option reply of 1073741824 bytes")


def test_not_an_nbd_server(fake):
    srv = fake(go_reply(1 << 20), greeting=b"HTTP/1.1 400 Bad Request\r\n\r\n")
    one_line_error(["info", srv.uri], "Not an NBD server")


def test_oldstyle_refused(fake):
    srv = fake(go_reply(1 << 20), greeting=struct.pack(">QQQI", P.NBDMAGIC, 0x00420281861253, 1 << 20, 0)
               + bytes(124))
    one_line_error(["info", srv.uri], "oldstyle")


def test_oversize_read_chunk(fake, tmp_path):
    def reply(req):
        _, _, cmd, cookie, offset, length = req
        # a data chunk claiming 1 GiB for a small read
        return P.chunk_header(cookie, P.REPLY_TYPE_OFFSET_DATA, 1 << 30) + struct.pack(">Q", 0)
    srv = fake(go_reply(1 << 20), reply)
    read_fails(srv.uri, "data chunk of 1073741824 bytes")
    # the command line says it in one line too
    one_line_error(["convert", "-f", "raw", "-O", "raw", srv.uri, str(tmp_path / "o.raw")],
                   "data chunk of 1073741824 bytes")


def test_wrong_cookie(fake):
    def reply(req):
        return P.simple_reply(req[3] + 7) + bytes(req[5])
    srv = fake(go_reply(1 << 20), reply)
    read_fails(srv.uri, "cookie")


def test_server_error_is_reported(fake):
    def reply(req):
        return P.error_chunk(req[3], P.EIO, "disk on fire")
    srv = fake(go_reply(1 << 20), reply)
    read_fails(srv.uri, "disk on fire")


def test_hole_chunks_read_as_zeros(fake):
    def reply(req):
        _, _, cmd, cookie, offset, length = req
        half = length // 2
        return (P.chunk_header(cookie, P.REPLY_TYPE_OFFSET_DATA, 8 + half, done=False)
                + struct.pack(">Q", offset) + b"\xab" * half
                + P.chunk_header(cookie, P.REPLY_TYPE_OFFSET_HOLE, 12)
                + struct.pack(">QI", offset + half, length - half))
    srv = fake(go_reply(1 << 20), reply)
    import blockdrv
    with blockdrv.open_image(srv.uri, fmt="raw") as img:
        assert img.read(0, 8192) == b"\xab" * 4096 + bytes(4096)
