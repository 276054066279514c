"""A blocking NBD client (NetworkBlockDevice/nbd ``doc/proto.md``).

Fixed newstyle handshake, ``NBD_OPT_STRUCTURED_REPLY`` and the
``base:allocation`` meta context when the server has them, ``NBD_OPT_GO``
(falling back to ``NBD_OPT_EXPORT_NAME`` on servers without it), then one
request at a time on a blocking socket.  The wire constants are the export's
(:mod:`blockdrv.exports.nbd.protocol`).

Everything the server sends is bounded before it is read: option replies
(64 KiB), reply chunks (a read's payload plus its header, block-status
replies 1 MiB), the export size (at most 2**63 - 1) and its block sizes.
A server breaking the protocol loses the connection; every later request
fails with the reason.
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
import threading

from ...errors import (BlockDriverError, BlockIOError, InvalidArgumentError, NoSpaceError,
                       ReadOnlyError, UnsupportedError)
from ...exports.nbd import protocol as P
from .uri import Address

OLDSTYLE_MAGIC = 0x00420281861253
MAX_OPTION_REPLY = P.MAX_OPTION_DATA
MAX_STATUS_REPLY = 1 << 20
MAX_REQUEST = P.MAX_PAYLOAD               # our own cap on one read/write
MAX_SIZE = (1 << 63) - 1
BASE_ALLOCATION = "base:allocation"

_NBD_TO_HOST = {
    P.EPERM: _errno.EPERM, P.EIO: _errno.EIO, P.ENOMEM: _errno.ENOMEM,
    P.EINVAL: _errno.EINVAL, P.ENOSPC: _errno.ENOSPC, P.EOVERFLOW: _errno.EOVERFLOW,
    P.ENOTSUP: _errno.ENOTSUP, P.ESHUTDOWN: _errno.ESHUTDOWN,
}

_OPT_ERRORS = {
    P.REP_ERR_UNSUP: "option not supported",
    P.REP_ERR_POLICY: "denied by the server's policy",
    P.REP_ERR_INVALID: "invalid request",
    P.REP_ERR_PLATFORM: "not supported on the server's platform",
    P.REP_ERR_TLS_REQD: "TLS required",
    P.REP_ERR_UNKNOWN: "Requested export not available",
    P.REP_ERR_SHUTDOWN: "server shutting down",
    P.REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    P.REP_ERR_TOO_BIG: "request too big",
}


class ProtocolError(BlockIOError):
    """The server broke the NBD protocol; the connection is closed."""


def _host_error(nbd_errno: int, what: str, message: str = "") -> BlockDriverError:
    code = _NBD_TO_HOST.get(nbd_errno, _errno.EIO)
    text = f"NBD server failed {what}: {message or _errno.errorcode.get(code, 'EIO')}"
    cls = {_errno.EPERM: ReadOnlyError, _errno.ENOSPC: NoSpaceError,
           _errno.ENOTSUP: UnsupportedError, _errno.EINVAL: InvalidArgumentError
           }.get(code, BlockIOError)
    return cls(text, errno=code)


class OptionError(BlockDriverError):
    """An option the server answered with ``NBD_REP_ERR_*``."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option, self.reply, self.server_message = option, reply, message
        text = _OPT_ERRORS.get(reply, f"error {reply & ~(1 << 31)}")
        super().__init__(f"{text}: {message}" if message else text,
                         errno=_errno.ENOTSUP if reply == P.REP_ERR_UNSUP else _errno.EIO)


class NBDClient:
    """One connection to one export."""

    def __init__(self, addr: Address, timeout: float | None = 60.0) -> None:
        self.addr = addr
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.pref_block = 4096
        self.max_block = MAX_REQUEST
        self.structured = False
        self.context_id: int | None = None      # base:allocation
        self.sock: socket.socket | None = None
        self.dead: str | None = None            # why the connection is unusable
        self._cookie = 0
        self._negotiating = False
        self._lock = threading.Lock()
        self._connect(timeout)
        try:
            self._handshake()
        except BaseException:
            self._abort()
            raise

    # -- connection -----------------------------------------------------------------

    def _connect(self, timeout: float | None) -> None:
        a = self.addr
        try:
            if a.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(a.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((a.host, a.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except socket.gaierror as exc:
            raise BlockIOError(f"Failed to connect to '{a.describe()}': "
                               f"address resolution failed: {exc.strerror}",
                               errno=_errno.EHOSTUNREACH) from None
        except socket.timeout:
            raise BlockIOError(f"Failed to connect to '{a.describe()}': timed out",
                               errno=_errno.ETIMEDOUT) from None
        except OSError as exc:
            raise BlockIOError(f"Failed to connect to '{a.describe()}': "
                               f"{exc.strerror or exc}", errno=exc.errno or _errno.EIO) from None
        self.sock = sock

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _abort(self) -> None:
        """Leave the option phase politely (NBD_OPT_ABORT) and hang up."""
        if self.sock is not None and self._negotiating:
            try:
                self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.OPT_ABORT, 0))
            except OSError:
                pass
        self._close_socket()

    def _fail(self, why: str) -> ProtocolError:
        """Mark the connection dead (closing it) and return the error to raise."""
        self.dead = why
        self._close_socket()
        return ProtocolError(why)

    def _recv_into(self, view: memoryview) -> None:
        sock = self.sock
        if sock is None:
            raise BlockIOError(f"NBD connection lost: {self.dead or 'closed'}")
        got = 0
        n = len(view)
        try:
            while got < n:
                k = sock.recv_into(view[got:], n - got)
                if k == 0:
                    raise self._fail("NBD server closed the connection")
                got += k
        except socket.timeout:
            raise self._fail("NBD server did not answer in time") from None
        except OSError as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise self._fail(f"NBD connection lost: {exc.strerror or exc}") from None

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, *parts) -> None:
        sock = self.sock
        if sock is None:
            raise BlockIOError(f"NBD connection lost: {self.dead or 'closed'}")
        try:
            for part in parts:
                sock.sendall(part)
        except socket.timeout:
            raise self._fail("NBD server did not accept the request in time") from None
        except OSError as exc:
            raise self._fail(f"NBD connection lost: {exc.strerror or exc}") from None

    # -- handshake ----------------------------------------------------------------------

    def _handshake(self) -> None:
        magic, second, hflags = P.GREETING.unpack(self._recv(P.GREETING.size))
        if magic != P.NBDMAGIC:
            raise self._fail("Not an NBD server (bad greeting magic)")
        if second == OLDSTYLE_MAGIC:
            raise UnsupportedError("The server uses the oldstyle NBD handshake, "
                                   "which blockdrv does not support")
        if second != P.IHAVEOPT:
            raise self._fail("Not an NBD server (bad newstyle magic)")
        if not hflags & P.FLAG_FIXED_NEWSTYLE:
            raise UnsupportedError("The server does not offer fixed newstyle negotiation")
        self.no_zeroes = bool(hflags & P.FLAG_NO_ZEROES)
        cflags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        self._send(P.CLIENT_FLAGS.pack(cflags))
        self._negotiating = True

        try:
            self._option(P.OPT_STRUCTURED_REPLY, b"", lambda reply, data: None)
            self.structured = True
        except OptionError as exc:
            if exc.reply == P.REP_ERR_TLS_REQD:
                raise self._tls_required() from None
        if self.structured:
            self._set_meta_context()
        self._go()

    def _tls_required(self) -> BlockDriverError:
        return UnsupportedError("The NBD server requires TLS, which blockdrv's NBD client "
                                "does not support yet", errno=_errno.EPROTONOSUPPORT)

    def _option(self, option: int, data: bytes, on_reply) -> None:
        """Send one option; pass every non-ACK reply to ``on_reply(type, data)``
        until the ACK.  An error reply raises :class:`OptionError`."""
        self._send(P.OPTION.pack(P.IHAVEOPT, option, len(data)), data)
        for _ in range(1 << 16):
            magic, opt, reply, length = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
            if magic != P.OPT_REPLY_MAGIC:
                raise self._fail("NBD server sent a bad option reply magic")
            if opt != option:
                raise self._fail(f"NBD server answered option {opt} to option {option}")
            if length > MAX_OPTION_REPLY:
                raise self._fail(f"NBD server sent an option reply of {length} bytes "
                                 f"(more than {MAX_OPTION_REPLY})")
            payload = self._recv(length) if length else b""
            if reply == P.REP_ACK:
                return
            if reply & (1 << 31):
                raise OptionError(option, reply, payload.decode("utf-8", "replace")
                                  .replace("\n", " ").strip())
            on_reply(reply, payload)
        raise self._fail("NBD server sent too many option replies")

    def _set_meta_context(self) -> None:
        name = self.addr.export.encode()
        query = BASE_ALLOCATION.encode()
        data = (P.U32.pack(len(name)) + name + P.U32.pack(1)
                + P.U32.pack(len(query)) + query)
        found: dict[str, int] = {}

        def on_reply(reply: int, payload: bytes) -> None:
            if reply != P.REP_META_CONTEXT or len(payload) < 4:
                raise self._fail("NBD server sent a malformed meta context reply")
            found[payload[4:].decode("utf-8", "replace")] = P.U32.unpack(payload[:4])[0]

        try:
            self._option(P.OPT_SET_META_CONTEXT, data, on_reply)
        except OptionError as exc:
            if exc.reply == P.REP_ERR_TLS_REQD:
                raise self._tls_required() from None
            return          # no block status: everything reads as data
        self.context_id = found.get(BASE_ALLOCATION)

    def _go(self) -> None:
        name = self.addr.export.encode()
        data = P.U32.pack(len(name)) + name + P.U16.pack(1) + P.U16.pack(P.INFO_BLOCK_SIZE)
        got_export = []

        def on_reply(reply: int, payload: bytes) -> None:
            if reply != P.REP_INFO or len(payload) < 2:
                return          # unknown replies are ignored, as the standard says
            kind = P.U16.unpack(payload[:2])[0]
            if kind == P.INFO_EXPORT:
                if len(payload) != 12:
                    raise self._fail("NBD server sent a malformed NBD_INFO_EXPORT")
                size, flags = struct.unpack(">QH", payload[2:])
                self._set_export(size, flags)
                got_export.append(True)
            elif kind == P.INFO_BLOCK_SIZE:
                if len(payload) != 14:
                    raise self._fail("NBD server sent a malformed NBD_INFO_BLOCK_SIZE")
                self._set_block_sizes(*struct.unpack(">III", payload[2:]))

        try:
            self._option(P.OPT_GO, data, on_reply)
        except OptionError as exc:
            if exc.reply == P.REP_ERR_UNSUP:
                self._export_name()
                return
            if exc.reply == P.REP_ERR_TLS_REQD:
                raise self._tls_required() from None
            if exc.reply == P.REP_ERR_UNKNOWN:
                raise InvalidArgumentError(
                    f"Requested export '{self.addr.export}' not available"
                    + (f": {exc.server_message}" if exc.server_message else ""),
                    errno=_errno.ENOENT) from None
            raise BlockIOError(f"NBD server refused export '{self.addr.export}': "
                               f"{exc.message}") from None
        self._negotiating = False
        if not got_export:
            raise self._fail("NBD server accepted NBD_OPT_GO without sending the export size")

    def _export_name(self) -> None:
        """The pre-GO way in: no error reply, the server just hangs up."""
        name = self.addr.export.encode()
        self._negotiating = False
        self._send(P.OPTION.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)), name)
        try:
            size, flags = P.EXPORT_NAME_REPLY.unpack(self._recv(P.EXPORT_NAME_REPLY.size))
        except ProtocolError:
            raise InvalidArgumentError(
                f"Requested export '{self.addr.export}' not available",
                errno=_errno.ENOENT) from None
        if not self.no_zeroes:
            self._recv(124)
        self._set_export(size, flags)

    def _set_export(self, size: int, flags: int) -> None:
        if size > MAX_SIZE:
            raise self._fail(f"NBD server announced an export of {size} bytes "
                             f"(more than {MAX_SIZE})")
        self.size, self.flags = size, flags

    def _set_block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        def pow2(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0
        if not (pow2(minimum) and minimum <= 65536 and pow2(preferred)
                and preferred >= minimum and maximum >= minimum):
            raise self._fail(f"NBD server announced invalid block sizes "
                             f"{minimum}/{preferred}/{maximum}")
        self.min_block, self.pref_block = minimum, preferred
        self.max_block = max(minimum, min(maximum, MAX_REQUEST) // minimum * minimum)

    # -- transmission ---------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return bool(self.flags & P.FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.flags & P.FLAG_HAS_FLAGS and self.flags & flag)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 payload=None) -> int:
        if self.sock is None:
            raise BlockIOError(f"NBD connection lost: {self.dead or 'closed'}")
        self._cookie += 1
        header = P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, self._cookie, offset, length)
        if payload is None:
            self._send(header)
        else:
            self._send(header, *payload)
        return self._cookie

    def _reply_header(self, cookie: int):
        """(magic, ...) of the next reply, checked against ``cookie``."""
        head = self._recv(4)
        magic = P.U32.unpack(head)[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            _, error, got = P.SIMPLE_REPLY.unpack(head + self._recv(P.SIMPLE_REPLY.size - 4))
            if got != cookie:
                raise self._fail(f"NBD server answered cookie {got} instead of {cookie}")
            return magic, error, 0, 0, 0
        if magic == P.STRUCTURED_REPLY_MAGIC and self.structured:
            _, flags, kind, got, length = P.CHUNK.unpack(head + self._recv(P.CHUNK.size - 4))
            if got != cookie:
                raise self._fail(f"NBD server answered cookie {got} instead of {cookie}")
            return magic, 0, flags, kind, length
        raise self._fail(f"NBD server sent a bad reply magic {magic:#x}")

    def _error_chunk(self, kind: int, length: int, what: str) -> BlockDriverError:
        if length < 6 or length > 6 + P.MAX_STRING + 8:
            raise self._fail(f"NBD server sent a malformed error chunk ({length} bytes)")
        payload = self._recv(length)
        error, mlen = struct.unpack(">IH", payload[:6])
        extra = 8 if kind == P.REPLY_TYPE_ERROR_OFFSET else 0
        if 6 + mlen + extra != length or error == 0:
            raise self._fail("NBD server sent a malformed error chunk")
        return _host_error(error, what, payload[6:6 + mlen].decode("utf-8", "replace"))

    def _simple_command(self, cmd: int, offset: int, length: int, flags: int = 0,
                        payload=None, what: str = "") -> None:
        """A command whose reply carries no data (write, flush, trim, zeroes)."""
        with self._lock:
            cookie = self._request(cmd, offset, length, flags, payload)
            error: BlockDriverError | None = None
            while True:
                magic, err, cflags, kind, clen = self._reply_header(cookie)
                if magic == P.SIMPLE_REPLY_MAGIC:
                    if err:
                        raise _host_error(err, what)
                    return
                if kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                    error = error or self._error_chunk(kind, clen, what)
                elif kind == P.REPLY_TYPE_NONE and clen == 0:
                    pass
                else:
                    raise self._fail(f"NBD server sent chunk type {kind} to {what}")
                if cflags & P.REPLY_FLAG_DONE:
                    if error is not None:
                        raise error
                    return

    # -- reads ------------------------------------------------------------------------------

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        """Read ``sum(len(v) for v in views)`` bytes at ``offset`` (one request,
        at most ``max_block`` bytes) straight into ``views``."""
        length = sum(len(v) for v in views)
        with self._lock:
            cookie = self._request(P.CMD_READ, offset, length)
            magic, err, cflags, kind, clen = self._reply_header(cookie)
            if magic == P.SIMPLE_REPLY_MAGIC:
                if err:
                    raise _host_error(err, f"to read {length} bytes at {offset}")
                for v in views:
                    self._recv_into(v)
                return
            self._structured_read(cookie, offset, length, views,
                                  (magic, err, cflags, kind, clen))

    def _structured_read(self, cookie, offset, length, views, first) -> None:
        covered = 0
        error: BlockDriverError | None = None
        what = f"to read {length} bytes at {offset}"
        header = first
        while True:
            _, _, cflags, kind, clen = header
            if kind == P.REPLY_TYPE_OFFSET_DATA:
                if clen < 8 or clen - 8 > length:
                    raise self._fail(f"NBD server sent a data chunk of {clen} bytes "
                                     f"for a {length}-byte read")
                start = P.U64.unpack(self._recv(8))[0] - offset
                n = clen - 8
                if start < 0 or start + n > length:
                    raise self._fail("NBD server sent data outside the requested range")
                for part in _slice(views, start, n):
                    self._recv_into(part)
                covered += n
            elif kind == P.REPLY_TYPE_OFFSET_HOLE:
                if clen != 12:
                    raise self._fail("NBD server sent a malformed hole chunk")
                hoff, hlen = struct.unpack(">QI", self._recv(12))
                start = hoff - offset
                if start < 0 or hlen == 0 or start + hlen > length:
                    raise self._fail("NBD server sent a hole outside the requested range")
                for part in _slice(views, start, hlen):
                    part[:] = bytes(len(part))
                covered += hlen
            elif kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                error = error or self._error_chunk(kind, clen, what)
            elif kind == P.REPLY_TYPE_NONE and clen == 0:
                pass
            else:
                raise self._fail(f"NBD server sent chunk type {kind} to a read")
            if cflags & P.REPLY_FLAG_DONE:
                break
            header = self._reply_header(cookie)
            if header[0] != P.STRUCTURED_REPLY_MAGIC:
                raise self._fail("NBD server mixed simple and structured replies")
        if error is not None:
            raise error
        if covered != length:
            raise self._fail(f"NBD server answered {covered} of {length} bytes of a read")

    # -- block status -------------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[(length, nbd_flags), ...]`` from ``offset`` (base:allocation)."""
        length = min(length, 0xFFFFFFFF // self.min_block * self.min_block)
        what = f"block status at {offset}"
        with self._lock:
            cookie = self._request(P.CMD_BLOCK_STATUS, offset, length)
            extents: list[tuple[int, int]] = []
            error: BlockDriverError | None = None
            while True:
                magic, err, cflags, kind, clen = self._reply_header(cookie)
                if magic == P.SIMPLE_REPLY_MAGIC:
                    if err:
                        raise _host_error(err, what)
                    raise self._fail("NBD server answered block status with a simple reply")
                if kind == P.REPLY_TYPE_BLOCK_STATUS:
                    if clen < 12 or (clen - 4) % 8 or clen > MAX_STATUS_REPLY:
                        raise self._fail(f"NBD server sent a block status chunk of "
                                         f"{clen} bytes")
                    payload = self._recv(clen)
                    ctx = P.U32.unpack(payload[:4])[0]
                    if ctx == self.context_id and not extents:
                        extents = [struct.unpack_from(">II", payload, i)
                                   for i in range(4, clen, 8)]
                elif kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                    error = error or self._error_chunk(kind, clen, what)
                elif kind == P.REPLY_TYPE_NONE and clen == 0:
                    pass
                else:
                    raise self._fail(f"NBD server sent chunk type {kind} to block status")
                if cflags & P.REPLY_FLAG_DONE:
                    break
        if error is not None:
            raise error
        if not extents or any(n == 0 for n, _ in extents):
            raise self._fail("NBD server sent no usable extent for block status")
        return extents

    # -- writes ---------------------------------------------------------------------------------

    def write(self, offset: int, views: list[memoryview], fua: bool) -> None:
        length = sum(len(v) for v in views)
        self._simple_command(P.CMD_WRITE, offset, length, P.CMD_FLAG_FUA if fua else 0,
                             views, f"to write {length} bytes at {offset}")

    def flush(self) -> None:
        self._simple_command(P.CMD_FLUSH, 0, 0, what="to flush")

    def trim(self, offset: int, length: int) -> None:
        self._simple_command(P.CMD_TRIM, offset, length,
                             what=f"to trim {length} bytes at {offset}")

    def write_zeroes(self, offset: int, length: int, flags: int) -> None:
        self._simple_command(P.CMD_WRITE_ZEROES, offset, length, flags,
                             what=f"to write zeroes to {length} bytes at {offset}")

    def close(self) -> None:
        if self.sock is not None:
            try:
                with self._lock:
                    self._request(P.CMD_DISC, 0, 0)
                    self.sock.shutdown(socket.SHUT_RDWR)
            except (BlockDriverError, OSError):
                pass
            self._close_socket()


def _slice(views: list[memoryview], start: int, n: int) -> list[memoryview]:
    out = []
    pos = 0
    end = start + n
    for v in views:
        vend = pos + len(v)
        if vend > start and pos < end:
            out.append(v[max(start - pos, 0):min(end, vend) - pos])
        if vend >= end:
            break
        pos = vend
    return out
