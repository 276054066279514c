"""The asyncio NBD server: a listening socket, a bounded set of clients, and
per client the fixed-newstyle handshake then the transmission phase.

Transmission is pipelined: one reader task parses requests and starts one
handler task per request; handlers run concurrently against the node and
send their replies under the connection's write lock, in completion order.
What a client can make the server hold is bounded: a request's payload is at
most :data:`protocol.MAX_PAYLOAD`, and a client has at most
``max_inflight`` requests and ``inflight_bytes`` of read/write payload in
flight -- past that the reader stops reading its socket until replies go
out.  A client that breaks the protocol (bad magic, unknown flags, a stalled
handshake) loses its own connection and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import sys
from blockdrv._startup import dataclass
from typing import Callable

from ...errors import BlockDriverError
from .export import Export, ExportError
from . import protocol as P

HANDSHAKE_TIMEOUT = 10.0        # seconds for a client to reach transmission
DRAIN_TIMEOUT = 30.0            # seconds in-flight requests get at close
_DISCARD_CHUNK = 1 << 20
# Read replies at least this long are sent from the host file when the
# export allows it (sendfile(2)); shorter ones cost less as one preadv.
SENDFILE_MIN = 64 << 10
_ZEROS = memoryview(bytes(1 << 20))
# Send buffer asked for on unix-socket connections (the kernel caps it at
# net.core.wmem_max): room for two whole maximum-size read replies of
# qemu-img (2 MiB).  See _tune_socket.
UNIX_SNDBUF = 4 << 20


class ProtocolViolation(Exception):
    """The client broke a MUST of the standard: hard disconnect."""


@dataclass
class ClientStats:
    number: int
    requests: int = 0
    max_inflight: int = 0
    closed_because: str = ""


class _Budget:
    """Requests and payload bytes a client may have in flight.  Only the
    client's reader task acquires, so one event is enough to wake it."""

    def __init__(self, requests: int, nbytes: int) -> None:
        self.requests = requests
        self.nbytes = nbytes
        self._changed = asyncio.Event()

    async def acquire(self, nbytes: int) -> None:
        while self.requests <= 0 or self.nbytes < nbytes:
            self._changed.clear()
            await self._changed.wait()
        self.requests -= 1
        self.nbytes -= nbytes

    def release(self, nbytes: int) -> None:
        self.requests += 1
        self.nbytes += nbytes
        self._changed.set()


class _ReplyBuffers:
    """Read replies' buffers, kept for the next request of the same size.

    A fresh 2 MiB bytearray is zero-filled page by page on every request
    (page faults cost as much as the read itself), and a bytearray handed
    to the transport is copied once more by its slicing: replies go out as
    memoryviews over reused buffers instead.  A buffer is taken back only
    when the transport holds none of it: Python 3.11's socket transport
    copies what it cannot send at once; later versions and the TLS layer
    may keep a view of it, so there it must have gone out entirely.
    """

    KEEP = 8                     # per client: the in-flight reads of qemu's -m 8

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._count = 0

    def take(self, size: int) -> memoryview:
        free = self._free.get(size)
        if free:
            self._count -= 1
            return memoryview(free.pop())
        return memoryview(bytearray(size))

    def give(self, view: memoryview, transport, tls: bool) -> None:
        buf = view.obj
        try:
            view.release()
        except BufferError:          # still exported: not ours to reuse
            return
        if self._count >= self.KEEP or len(buf) > P.MAX_PAYLOAD:
            return
        if (tls or sys.version_info >= (3, 12)) and transport.get_write_buffer_size():
            return
        self._free.setdefault(len(buf), []).append(buf)
        self._count += 1


class NBDServer:
    """Serve one :class:`Export` on a listening socket.

    ``max_clients`` is qemu-nbd's ``-e`` (0: unlimited; further clients wait
    in the listen backlog); without ``persistent`` (``-t``) the server stops
    when its last client leaves.  ``log`` gets one line per event worth
    telling (``-v``).
    """

    def __init__(self, export: Export, *, ssl_context: ssl.SSLContext | None = None,
                 persistent: bool = False, max_clients: int = 1,
                 max_inflight: int = 64, inflight_bytes: int = 64 << 20,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 log: Callable[[str], None] | None = None) -> None:
        self.export = export
        self.ssl_context = ssl_context
        self.persistent = persistent
        self.max_clients = max_clients
        self.max_inflight = max_inflight
        self.inflight_bytes = max(inflight_bytes, P.MAX_PAYLOAD)
        self.handshake_timeout = handshake_timeout
        self.log = log or (lambda msg: None)
        self.sock: socket.socket | None = None
        self.unix_path: str | None = None
        self.clients: dict[_Client, asyncio.Task] = {}
        self.stats: list[ClientStats] = []
        self._slot = asyncio.Event()
        self._done = asyncio.Event()
        self._closing = False
        self._accept_task: asyncio.Task | None = None

    # -- listening ---------------------------------------------------------------------

    def listen_unix(self, path: str) -> None:
        """Listen on a unix socket at ``path``; a stale socket there is
        replaced, anything else refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(17, f"'{path}' exists and is not a socket")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock, self.unix_path = sock, path

    def listen_tcp(self, host: str, port: int) -> None:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.create_server(addr, family=family, backlog=16,
                                    dualstack_ipv6=False)
        sock.setblocking(False)
        self.sock = sock

    @property
    def address(self):
        return self.unix_path or (self.sock.getsockname() if self.sock else None)

    # -- running -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Accept clients until :meth:`shutdown`; returns when all are gone."""
        if self.sock is None:
            raise RuntimeError("listen_unix or listen_tcp first")
        self._accept_task = asyncio.create_task(self._accept_loop())
        await self._done.wait()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        number = 0
        while not self._closing:
            while self.max_clients and len(self.clients) >= self.max_clients:
                self._slot.clear()
                await self._slot.wait()
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                if self._closing:
                    return
                self.log(f"accept failed: {exc.strerror or exc}")
                await asyncio.sleep(0.1)
                continue
            number += 1
            _tune_socket(conn)
            client = _Client(self, conn, number)
            self.stats.append(client.stats)
            self.clients[client] = asyncio.create_task(client.run())
            self.clients[client].add_done_callback(lambda _t, c=client: self._gone(c))

    def _gone(self, client: "_Client") -> None:
        self.clients.pop(client, None)
        s = client.stats
        self.log(f"client {s.number}: closed ({s.closed_because or 'disconnected'}); "
                 f"{s.requests} requests, max {s.max_inflight} in flight")
        self._slot.set()
        if not self.persistent and not self.clients and not self._closing:
            asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        """Stop accepting, remove the socket file, let in-flight requests
        finish and close every client.  Idempotent."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self.sock is not None:
            self.sock.close()
        if self.unix_path is not None:
            try:
                os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
        tasks = list(self.clients.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT + 5)
        self._done.set()

    @property
    def max_inflight_seen(self) -> int:
        return max((s.max_inflight for s in self.stats), default=0)


def _tune_socket(conn: socket.socket) -> None:
    """A bigger send buffer for a unix-socket client.

    A unix stream socket reports itself writable again only once the peer
    has drained it to a quarter of its send buffer.  With the default
    (about 208 KiB) a 2 MiB read reply goes out as eight sendfile calls,
    each followed by the client emptying the socket and waking this process
    -- a round trip through both schedulers per 256 KiB, and a reader that
    sits idle whenever this process is slow to be scheduled.  With room for
    whole replies, a reply is one call.  TCP sizes its buffers itself (a
    fixed SO_SNDBUF would turn that off), so it is left alone."""
    if conn.family != socket.AF_UNIX:
        return
    try:
        if conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < UNIX_SNDBUF:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
    except OSError:
        pass                    # only slower


class _Client:
    """One connection: handshake, then the request pipeline."""

    def __init__(self, server: NBDServer, conn: socket.socket, number: int) -> None:
        self.server = server
        self.export = server.export
        self.conn = conn
        self.stats = ClientStats(number)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tls = False
        self.no_zeroes = False
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.handlers: set[asyncio.Task] = set()
        self.inflight = 0
        self.wlock = asyncio.Lock()
        self.flags = 0
        self.buffers = _ReplyBuffers()
        self.host_files: dict[int, object] = {}

    def log(self, msg: str) -> None:
        self.server.log(f"client {self.stats.number}: {msg}")

    # -- life cycle ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._connect()
            try:
                async with asyncio.timeout(self.server.handshake_timeout):
                    go = await self._handshake()
            except TimeoutError:
                raise ProtocolViolation("handshake timed out") from None
            if go:
                await self._transmission()
        except asyncio.CancelledError:
            self.stats.closed_because = "server shutting down"
        except asyncio.IncompleteReadError:
            self.stats.closed_because = self.stats.closed_because or "client went away"
        except ProtocolViolation as exc:
            self.stats.closed_because = f"protocol violation: {exc}"
        except BlockDriverError as exc:   # an OSError, but the image's: not the link's
            self._internal_error(exc)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            self.stats.closed_because = f"connection error: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bug costs this connection only
            self._internal_error(exc)
        finally:
            await self._finish()

    def _internal_error(self, exc: BaseException) -> None:
        self.stats.closed_because = f"internal error: {type(exc).__name__}: {exc}"
        print(f"blockdrv nbd: client {self.stats.number}: internal error: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        reader = asyncio.StreamReader(limit=1 << 20)

        def connected(r, w) -> None:
            ready.set_result(w)
        # A client_connected_cb makes the stream server-side (start_tls).
        await loop.connect_accepted_socket(
            lambda: asyncio.StreamReaderProtocol(reader, connected), self.conn)
        self.reader, self.writer = reader, await ready

    async def _finish(self) -> None:
        if self.handlers:
            # In-flight requests complete (the image stays consistent); the
            # replies of a vanished client go nowhere.  Handlers suspend only
            # to send; one still waiting after the timeout (a client that
            # stopped reading; shorter when the server stops) loses its
            # transport and finishes with a connection error.
            wait = 5.0 if self.server._closing else DRAIN_TIMEOUT
            _, pending = await asyncio.wait(list(self.handlers), timeout=wait)
            if pending and self.writer is not None:
                self.writer.transport.abort()
                await asyncio.wait(pending, timeout=5)
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                pass
        else:
            self.conn.close()
        for f in self.host_files.values():
            f.close()                   # the objects only: the fds are the nodes'
        self.host_files.clear()

    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _send(self, *parts) -> None:
        async with self.wlock:
            for part in parts:
                self.writer.write(part)
            await self.writer.drain()

    async def _send_from_host(self, header: bytes, pieces) -> None:
        """A read reply whose payload goes from the host files to the socket
        with sendfile(2): no copy into this process, none into the
        transport's buffer.  The header is out before the payload, so a
        failure part-way can only end the connection."""
        loop = asyncio.get_running_loop()
        transport = self.writer.transport
        async with self.wlock:
            self.writer.write(header)
            try:
                for fd, at, n in pieces:
                    sent = 0
                    if fd >= 0:
                        sent = await loop.sendfile(transport, self._host_file(fd), at, n)
                    while sent < n:         # zeros, or a host file shorter than its map
                        k = min(n - sent, len(_ZEROS))
                        self.writer.write(_ZEROS[:k])
                        sent += k
                await self.writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                raise
            except (OSError, RuntimeError) as exc:
                transport.abort()
                raise ConnectionError(f"read reply cut short: {exc}") from None

    def _host_file(self, fd: int):
        """A file object over ``fd`` (loop.sendfile takes one), not owning it."""
        f = self.host_files.get(fd)
        if f is None:
            f = self.host_files[fd] = open(fd, "rb", buffering=0, closefd=False)
        return f

    # -- handshake -----------------------------------------------------------------------

    async def _handshake(self) -> bool:
        """Option haggling; True to enter transmission, False on ABORT."""
        await self._send(P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT,
                                         P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = P.CLIENT_FLAGS.unpack(await self._read(4))
        if cflags & ~P.CLIENT_FLAGS_KNOWN:
            raise ProtocolViolation(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION.unpack(await self._read(P.OPTION.size))
            if magic != P.IHAVEOPT:
                raise ProtocolViolation(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_DATA:
                raise ProtocolViolation(f"option {opt} with {length} bytes of data")
            data = await self._read(length)
            if self.server.ssl_context is not None and not self.tls \
                    and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    raise ProtocolViolation("NBD_OPT_EXPORT_NAME before TLS")
                await self._opt_reply(opt, P.REP_ERR_TLS_REQD,
                                      "TLS is required: send NBD_OPT_STARTTLS first")
                continue
            try:
                result = await self._option(opt, data)
            except P.Malformed as exc:
                await self._opt_reply(opt, P.REP_ERR_INVALID, str(exc))
                continue
            if result is not None:
                return result

    async def _opt_reply(self, opt: int, reply: int, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode()
        await self._send(P.option_reply(opt, reply, data))

    async def _option(self, opt: int, data: bytes) -> bool | None:
        exp = self.export
        if opt == P.OPT_EXPORT_NAME:
            name = P.Cursor(data).string(len(data)) if len(data) <= P.MAX_STRING else None
            if name != exp.name:
                raise ProtocolViolation("NBD_OPT_EXPORT_NAME for an unknown export")
            reply = P.EXPORT_NAME_REPLY.pack(exp.size, self._flags())
            await self._send(reply if self.no_zeroes else reply + bytes(124))
            return True
        if opt == P.OPT_ABORT:
            try:
                await self._opt_reply(opt, P.REP_ACK)
            except ConnectionError:
                pass
            self.stats.closed_because = "client aborted the handshake"
            return False
        if opt == P.OPT_LIST:
            if data:
                raise P.Malformed("NBD_OPT_LIST takes no data")
            name = exp.name.encode()
            await self._opt_reply(opt, P.REP_SERVER, P.U32.pack(len(name)) + name
                                  + (exp.opts.description or "").encode())
            await self._opt_reply(opt, P.REP_ACK)
            return None
        if opt == P.OPT_STARTTLS:
            return await self._starttls(data)
        if opt in (P.OPT_INFO, P.OPT_GO):
            return await self._info(opt, data)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                raise P.Malformed("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            await self._opt_reply(opt, P.REP_ACK)
            return None
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return None
        await self._opt_reply(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    async def _starttls(self, data: bytes) -> None:
        opt = P.OPT_STARTTLS
        if self.server.ssl_context is None:
            await self._opt_reply(opt, P.REP_ERR_POLICY, "TLS is not configured")
            return None
        if data:
            raise P.Malformed("NBD_OPT_STARTTLS takes no data")
        if self.tls:
            raise P.Malformed("TLS is already negotiated")
        # Stop reading plain text before the ACK: the client's first TLS
        # record must reach the TLS layer, not the stream's buffer.
        self.writer.transport.pause_reading()
        await self._opt_reply(opt, P.REP_ACK)
        await self.writer.start_tls(self.server.ssl_context)
        self.tls = True
        # The standard: no negotiation state survives STARTTLS.
        self.structured = False
        self.contexts = {}
        return None

    async def _info(self, opt: int, data: bytes) -> bool | None:
        cur = P.Cursor(data)
        name = cur.string(cur.u32())
        requests = [cur.u16() for _ in range(cur.u16())]
        cur.end()
        exp = self.export
        if name != exp.name:
            await self._opt_reply(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        replies = [P.info_export(exp.size, self._flags())]
        if P.INFO_NAME in requests:
            replies.append(P.info_string(P.INFO_NAME, exp.name))
        if P.INFO_DESCRIPTION in requests and exp.opts.description:
            replies.append(P.info_string(P.INFO_DESCRIPTION, exp.opts.description))
        replies.append(P.info_block_size(*exp.block_sizes()))
        for info in replies:
            await self._opt_reply(opt, P.REP_INFO, info)
        await self._opt_reply(opt, P.REP_ACK)
        return True if opt == P.OPT_GO else None

    async def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == P.OPT_SET_META_CONTEXT
        if setting:
            self.contexts = {}          # replaced even when the option fails
        if not self.structured:
            raise P.Malformed("negotiate structured replies first")
        cur = P.Cursor(data)
        name = cur.string(cur.u32())
        count = cur.u32()
        if count > 256:
            await self._opt_reply(opt, P.REP_ERR_TOO_BIG, "too many queries")
            return
        queries = [cur.string(cur.u32()) for _ in range(count)]
        cur.end()
        if name != self.export.name:
            await self._opt_reply(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        found = self.export.match_contexts(queries, listing=not setting)
        for i, ctx in enumerate(found, 1):
            ctx_id = i if setting else 0
            if setting:
                self.contexts[ctx_id] = ctx
            await self._opt_reply(opt, P.REP_META_CONTEXT, P.U32.pack(ctx_id) + ctx.encode())
        await self._opt_reply(opt, P.REP_ACK)

    def _flags(self) -> int:
        self.flags = self.export.transmission_flags(self.structured)
        return self.flags

    # -- transmission ------------------------------------------------------------------

    async def _transmission(self) -> None:
        srv = self.server
        budget = _Budget(srv.max_inflight, srv.inflight_bytes)
        self.log("entered transmission" + (" (TLS)" if self.tls else ""))
        while True:
            hdr = await self._read(P.REQUEST.size)
            magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(hdr)
            if magic != P.REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            self.stats.requests += 1
            if cmd == P.CMD_DISC:
                self.stats.closed_because = "client disconnected (NBD_CMD_DISC)"
                return
            payload = None
            charge = 0
            if cmd == P.CMD_WRITE:
                if length > P.MAX_PAYLOAD:
                    # Read past it a piece at a time; the client gets EINVAL.
                    await self._discard(length)
                    await budget.acquire(0)
                    self._start(budget, 0, self._refuse(
                        cookie, cmd, P.EINVAL,
                        f"write of {length} bytes exceeds the maximum payload "
                        f"({P.MAX_PAYLOAD})"))
                    continue
                charge = length
                await budget.acquire(charge)
                payload = await self._read(length)
            else:
                if cmd == P.CMD_READ:
                    charge = min(length, P.MAX_PAYLOAD)
                await budget.acquire(charge)
            self._start(budget, charge, self._request(flags, cmd, cookie, offset, length,
                                                      payload))

    def _start(self, budget: _Budget, charge: int, coro) -> None:
        self.inflight += 1
        if self.inflight > self.stats.max_inflight:
            self.stats.max_inflight = self.inflight
        task = asyncio.get_running_loop().create_task(coro)
        self.handlers.add(task)

        def done(t: asyncio.Task) -> None:
            self.handlers.discard(t)
            self.inflight -= 1
            budget.release(charge)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                if (not isinstance(exc, (ConnectionError, OSError))
                        or isinstance(exc, BlockDriverError)):
                    print(f"blockdrv nbd: client {self.stats.number}: internal error: "
                          f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        task.add_done_callback(done)

    async def _discard(self, length: int) -> None:
        while length:
            n = min(length, _DISCARD_CHUNK)
            await self._read(n)
            length -= n

    async def _refuse(self, cookie: int, cmd: int, error: int, message: str) -> None:
        await self._error(cookie, cmd, error, message)

    async def _error(self, cookie: int, cmd: int, error: int, message: str) -> None:
        if self.structured:
            await self._send(P.error_chunk(cookie, error, message))
        else:
            await self._send(P.simple_reply(cookie, error))

    _ALLOWED = {
        P.CMD_READ: P.CMD_FLAG_DF,
        P.CMD_WRITE: 0,
        P.CMD_FLUSH: 0,
        P.CMD_TRIM: 0,
        P.CMD_CACHE: 0,
        P.CMD_WRITE_ZEROES: P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
        P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE,
    }

    async def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                       payload: bytes | None) -> None:
        try:
            await self._dispatch(flags, cmd, cookie, offset, length, payload)
        except ExportError as exc:
            await self._error(cookie, cmd, exc.error, exc.message)
        except ConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: EIO to this request only
            print(f"blockdrv nbd: client {self.stats.number}: internal error in "
                  f"{P.CMD_NAMES.get(cmd, cmd)}: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            await self._error(cookie, cmd, P.EIO, "internal error")

    async def _dispatch(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                        payload: bytes | None) -> None:
        exp = self.export
        allowed = self._ALLOWED.get(cmd)
        if allowed is None:
            raise ExportError(P.EINVAL, f"unknown command {cmd}")
        allowed |= P.CMD_FLAG_FUA
        if cmd == P.CMD_READ and not self.structured:
            allowed &= ~P.CMD_FLAG_DF
        if flags & ~allowed:
            raise ExportError(P.EINVAL, f"flags {flags & ~allowed:#x} are not valid "
                                        f"for {P.CMD_NAMES[cmd]}")
        fua = bool(flags & P.CMD_FLAG_FUA)
        if cmd == P.CMD_READ:
            await self._do_read(flags, cookie, offset, length)
            return
        if cmd == P.CMD_BLOCK_STATUS:
            await self._do_block_status(flags, cookie, offset, length)
            return
        if cmd == P.CMD_WRITE:
            await exp.write(offset, payload, fua)
        elif cmd == P.CMD_FLUSH:
            await exp.flush()
        elif cmd == P.CMD_TRIM:
            await exp.trim(offset, length, fua)
        elif cmd == P.CMD_CACHE:
            await exp.cache(offset, length)
        elif cmd == P.CMD_WRITE_ZEROES:
            await exp.write_zeroes(offset, length, fua, bool(flags & P.CMD_FLAG_NO_HOLE),
                                   bool(flags & P.CMD_FLAG_FAST_ZERO))
        await self._send(P.simple_reply(cookie))

    async def _do_read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        exp = self.export
        if length > P.MAX_PAYLOAD:
            if not self.structured:
                raise ExportError(P.EINVAL, f"read of {length} bytes exceeds the maximum "
                                            f"payload ({P.MAX_PAYLOAD})")
            if flags & P.CMD_FLAG_DF:
                raise ExportError(P.EOVERFLOW, f"read of {length} bytes cannot be sent "
                                               "unfragmented")
            exp._check(offset, length)
            # Several data chunks, one buffer's worth at a time.
            pos, end = offset, offset + length
            while pos < end:
                n = min(end - pos, P.MAX_PAYLOAD)
                buf = self.buffers.take(P.CHUNK.size + 8 + n)
                try:
                    await exp.read(pos, buf[P.CHUNK.size + 8:])
                    P.CHUNK.pack_into(buf, 0, P.STRUCTURED_REPLY_MAGIC, 0,
                                      P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n)
                    P.U64.pack_into(buf, P.CHUNK.size, pos)
                    await self._send(buf)
                finally:
                    self.buffers.give(buf, self.writer.transport, self.tls)
                pos += n
            await self._send(P.chunk_header(cookie, P.REPLY_TYPE_NONE, 0))
            return
        if self.structured:
            if length == 0:
                exp._check(offset, 0)
                await self._send(P.chunk_header(cookie, P.REPLY_TYPE_NONE, 0))
                return
            head = P.CHUNK.size + 8
        else:
            head = P.SIMPLE_REPLY.size
        if length >= SENDFILE_MIN and not self.tls:
            pieces = await exp.host_extents(offset, length)
            if pieces is not None:
                if self.structured:
                    header = P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                          P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) \
                        + P.U64.pack(offset)
                else:
                    header = P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)
                await self._send_from_host(header, pieces)
                return
        buf = self.buffers.take(head + length)
        try:
            await exp.read(offset, buf[head:])
            if self.structured:
                P.CHUNK.pack_into(buf, 0, P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                  P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length)
                P.U64.pack_into(buf, P.CHUNK.size, offset)
            else:
                P.SIMPLE_REPLY.pack_into(buf, 0, P.SIMPLE_REPLY_MAGIC, 0, cookie)
            await self._send(buf)
        finally:
            self.buffers.give(buf, self.writer.transport, self.tls)

    async def _do_block_status(self, flags: int, cookie: int, offset: int,
                               length: int) -> None:
        if not self.contexts:
            raise ExportError(P.EINVAL, "no metadata context was negotiated")
        req_one = bool(flags & P.CMD_FLAG_REQ_ONE)
        chunks = []
        for ctx_id, ctx in self.contexts.items():
            extents = await self.export.extents(ctx, offset, length, req_one)
            if req_one:
                extents = extents[:1]
            chunks.append((ctx_id, extents))
        parts = [P.block_status_chunk(cookie, ctx_id, ext, done=i == len(chunks) - 1)
                 for i, (ctx_id, ext) in enumerate(chunks)]
        await self._send(*parts)
