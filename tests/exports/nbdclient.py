"""A small blocking NBD client for the tests: speaks the handshake and the
transmission phase byte by byte, so tests can also send what a real client
never would (bad magic, oversize lengths, requests before GO)."""

from __future__ import annotations

import socket
import struct

from blockdrv.exports.nbd import protocol as P


class NBDClientError(Exception):
    pass


class Reply:
    def __init__(self, cookie: int, error: int = 0, data: bytes = b"",
                 chunks: list | None = None, message: str = "") -> None:
        self.cookie, self.error, self.data = cookie, error, data
        self.chunks = chunks or []
        self.message = message


class Client:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.size = 0
        self.flags = 0
        self.contexts: dict[int, str] = {}
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw I/O -------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += part
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server hung up (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # -- handshake -----------------------------------------------------------------------

    def greet(self, client_flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, hflags = P.GREETING.unpack(self.recv(P.GREETING.size))
        if (magic, opt_magic) != (P.NBDMAGIC, P.IHAVEOPT):
            raise NBDClientError("bad greeting")
        self.send(P.CLIENT_FLAGS.pack(client_flags))
        self.no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        return hflags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(P.OPTION.pack(P.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        if magic != P.OPT_REPLY_MAGIC:
            raise NBDClientError(f"bad option reply magic {magic:#x}")
        return opt, rtype, self.recv(length)

    def opt_replies(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, collect replies up to the final ACK or error."""
        self.option(opt, data)
        out = []
        while True:
            o, rtype, payload = self.opt_reply()
            assert o == opt
            out.append((rtype, payload))
            if rtype == P.REP_ACK or rtype & (1 << 31):
                return out

    def structured_reply(self) -> int:
        rtype = self.opt_replies(P.OPT_STRUCTURED_REPLY)[-1][0]
        self.structured = rtype == P.REP_ACK
        return rtype

    @staticmethod
    def meta_data(name: str, queries: list[str]) -> bytes:
        out = P.U32.pack(len(name.encode())) + name.encode() + P.U32.pack(len(queries))
        for q in queries:
            out += P.U32.pack(len(q.encode())) + q.encode()
        return out

    def set_meta(self, queries: list[str], name: str = "") -> list[tuple[int, bytes]]:
        replies = self.opt_replies(P.OPT_SET_META_CONTEXT, self.meta_data(name, queries))
        for rtype, payload in replies:
            if rtype == P.REP_META_CONTEXT:
                self.contexts[P.U32.unpack(payload[:4])[0]] = payload[4:].decode()
        return replies

    @staticmethod
    def go_data(name: str, infos: list[int] = ()) -> bytes:
        n = name.encode()
        return (P.U32.pack(len(n)) + n + P.U16.pack(len(infos))
                + b"".join(P.U16.pack(i) for i in infos))

    def go(self, name: str = "", infos: list[int] = (), opt: int = P.OPT_GO):
        replies = self.opt_replies(opt, self.go_data(name, infos))
        info = {}
        for rtype, payload in replies:
            if rtype == P.REP_INFO:
                kind = P.U16.unpack(payload[:2])[0]
                info[kind] = payload[2:]
                if kind == P.INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", payload[2:])
        return replies[-1][0], info

    def connect(self, name: str = "", structured: bool = True, meta: list[str] = ()) -> None:
        self.greet()
        if structured:
            self.structured_reply()
            if meta:
                self.set_meta(list(meta), name)
        rtype, _ = self.go(name)
        if rtype != P.REP_ACK:
            raise NBDClientError(f"GO failed: {rtype:#x}")

    # -- transmission ----------------------------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"", cookie: int | None = None, magic: int = P.REQUEST_MAGIC
                ) -> int:
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        self.send(P.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + data)
        return cookie

    def reply(self, read_len: int | None = None) -> Reply:
        """One whole reply (all chunks of a structured one).  ``read_len``:
        the length of a READ answered with a simple reply."""
        magic = P.U32.unpack(self.recv(4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            data = (self.recv(read_len) if read_len and not error and not self.structured
                    else b"")
            return Reply(cookie, error, data)
        if magic != P.STRUCTURED_REPLY_MAGIC:
            raise NBDClientError(f"bad reply magic {magic:#x}")
        chunks, cookie, error, message = [], None, 0, ""
        data = {}
        while True:
            flags, rtype, ck, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            cookie = ck
            chunks.append((rtype, payload))
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                data[P.U64.unpack(payload[:8])[0]] = payload[8:]
            elif rtype & (1 << 15):
                error, mlen = struct.unpack(">IH", payload[:6])
                message = payload[6:6 + mlen].decode()
            if flags & P.REPLY_FLAG_DONE:
                break
            magic = P.U32.unpack(self.recv(4))[0]
            assert magic == P.STRUCTURED_REPLY_MAGIC
        joined = b"".join(data[k] for k in sorted(data))
        return Reply(cookie, error, joined, chunks, message)

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        cookie = self.request(P.CMD_READ, offset, length, flags)
        r = self.reply(length)
        assert r.cookie == cookie
        return r

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        cookie = self.request(P.CMD_WRITE, offset, len(data), flags, data)
        r = self.reply()
        assert r.cookie == cookie
        return r

    def cmd(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> Reply:
        cookie = self.request(cmd, offset, length, flags)
        r = self.reply()
        assert r.cookie == cookie
        return r

    def block_status(self, offset: int, length: int, flags: int = 0) -> dict[str, list]:
        r = self.cmd(P.CMD_BLOCK_STATUS, offset, length, flags)
        if r.error:
            raise NBDClientError(f"block status failed: {r.error}")
        out = {}
        for rtype, payload in r.chunks:
            if rtype == P.REPLY_TYPE_BLOCK_STATUS:
                ctx = self.contexts[P.U32.unpack(payload[:4])[0]]
                out[ctx] = [struct.unpack(">II", payload[i:i + 8])
                            for i in range(4, len(payload), 8)]
        return out

    def disconnect(self) -> None:
        self.request(P.CMD_DISC)
        self.close()
