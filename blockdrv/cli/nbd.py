"""``blockdrv nbd``: serve an image over NBD, as qemu-nbd does.

    blockdrv nbd [-r] [-f fmt] [-x name] [-D text] [-k socket | -p port -b addr]
                 [-t] [-e num] [-A] [--fork] [--pid-file file] [--cache mode]
                 [--discard mode] [--detect-zeroes mode] [-U] [-v]
                 [--object tls-creds-x509,id=ID,dir=DIR,endpoint=server
                  --tls-creds ID] filename

Every flag does what qemu-nbd's does; qemu-nbd flags blockdrv cannot honour
are refused with the reason (never accepted and ignored).  SIGTERM and SIGINT
stop the server cleanly: in-flight requests finish, the image is flushed and
closed (its locks released), the socket file and pid file are removed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from ..block import open_node
from ..common import O_FORCE_SHARE, O_RDWR
from ..errors import BlockDriverError
from ..engines.common import parse_cache_mode
from ..engines.common import open_error
from .common import PROBED_RAW_WARNING, ArgParser, CliError, report

# qemu-nbd flags blockdrv nbd refuses, and why.
_REFUSED = {
    ("-c", "--connect"): "there is no kernel NBD client here; serve on a socket and "
                         "attach it with nbd-client",
    ("-d", "--disconnect"): "there is no kernel NBD client here",
    ("-s", "--snapshot"): "temporary snapshot overlays are not implemented",
    ("-l", "--load-snapshot"): "internal snapshots are not supported by blockdrv's formats",
    ("-o", "--offset"): "exporting part of an image is not implemented",
    ("-B", "--bitmap"): "blockdrv's formats have no persistent dirty bitmaps",
    ("-L", "--list"): "blockdrv nbd is a server; use 'nbdinfo --list' as the client",
    ("--image-opts",): "image option strings are not supported; give a filename and -f",
    ("--aio",): "blockdrv has one I/O engine (synchronous host I/O under asyncio)",
    ("--tls-authz",): "TLS authorization objects are not supported",
    ("-T", "--trace"): "QEMU trace events do not exist here; use -v",
    ("--selinux-label",): "SELinux labels are not supported",
}
_REFUSED_TAKES_ARG = {"-c", "-l", "-o", "-B", "--aio", "--tls-authz", "-T",
                      "--selinux-label"}

DETECT_ZEROES = ("off", "on", "unmap")
DISCARD = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}


DESCRIPTION = """\
Serves one image (any format blockdrv opens, backing chains included) over the
NBD protocol until SIGTERM/SIGINT, or until the last client leaves without -t.
Block status is the image's real allocation (meta contexts base:allocation and,
with -A, qemu:allocation-depth)."""


def parser() -> ArgParser:
    p = ArgParser("nbd", DESCRIPTION)
    p.add_argument("filename", help="the image to serve")
    p.add_argument("-r", "--read-only", action="store_true",
                   help="export read-only (writes are refused)")
    p.add_argument("-f", "--format", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-x", "--export-name", default="", metavar="name",
                   help="the export's name (default: empty)")
    p.add_argument("-D", "--description", metavar="text",
                   help="the export's description, shown by NBD_OPT_LIST/INFO")
    p.add_argument("-k", "--socket", metavar="path",
                   help="listen on this Unix socket instead of TCP")
    p.add_argument("-p", "--port", metavar="port", help="TCP port (default 10809)")
    p.add_argument("-b", "--bind", metavar="addr", help="TCP address (default 0.0.0.0)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-e", "--shared", default="1", metavar="num",
                   help="clients served at once (0: unlimited; default 1)")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="offer the qemu:allocation-depth meta context")
    p.add_argument("--fork", action="store_true",
                   help="go to the background once the server listens")
    p.add_argument("--pid-file", metavar="file", help="write the server's pid here")
    p.add_argument("--cache", metavar="mode",
                   help="cache mode: writeback (default), writethrough, none, "
                        "directsync, unsafe")
    p.add_argument("-n", "--nocache", action="store_true", help="short for --cache=none")
    p.add_argument("--discard", default="ignore", metavar="mode",
                   help="discard mode: ignore/off (default) or unmap/on")
    p.add_argument("--detect-zeroes", default="off", metavar="mode",
                   help="turn zero-filled writes into zero writes: off, on, unmap")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out (with -r only)")
    p.add_argument("--object", action="append", default=[], metavar="spec",
                   help="tls-creds-x509,id=ID,dir=DIR,endpoint=server: TLS credentials")
    p.add_argument("--tls-creds", metavar="id", help="serve over TLS with these credentials")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log connections and errors on stderr")
    return p


def _refuse_unsupported(argv: list[str]) -> None:
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        for names, why in _REFUSED.items():
            short = [n for n in names if len(n) == 2]
            if name in names or (short and arg.startswith(short[0]) and len(arg) > 2
                                 and short[0] in _REFUSED_TAKES_ARG):
                raise CliError(f"option '{names[-1]}' is not supported: {why}")


class _Config:
    pass


def parse(argv: list[str]) -> _Config:
    _refuse_unsupported(argv)
    a = parser().parse_args(argv)
    c = _Config()
    c.filename, c.fmt, c.readonly = a.filename, a.fmt, a.read_only
    c.name, c.description = a.export_name, a.description
    if len(c.name.encode()) > 4096:
        raise CliError("export name too long")
    if c.description is not None and len(c.description.encode()) > 4096:
        raise CliError("description too long")
    c.persistent, c.fork, c.pid_file, c.verbose = a.persistent, a.fork, a.pid_file, a.verbose
    c.depth = a.allocation_depth
    try:
        c.shared = int(a.shared, 10)
    except ValueError:
        c.shared = -1
    if c.shared < 0:
        raise CliError(f"Invalid shared device number '{a.shared}'")
    # where to listen
    c.socket = a.socket
    if a.socket is not None and (a.port is not None or a.bind is not None):
        raise CliError("-k (unix socket) cannot be combined with -p or -b (TCP)")
    c.bind = a.bind if a.bind is not None else "0.0.0.0"
    c.port = 10809
    if a.port is not None:
        try:
            c.port = int(a.port, 10)
        except ValueError:
            c.port = -1
        if not 0 <= c.port <= 65535:
            raise CliError(f"Invalid port number '{a.port}'")
    # image options
    cache = a.cache
    if a.nocache:
        if cache is not None and cache != "none":
            raise CliError("-n and --cache can only be specified once")
        cache = "none"
    mode = parse_cache_mode(cache or "writeback")
    if mode is None:
        raise CliError(f"Invalid cache mode `{cache}'")
    c.cache = mode
    if a.discard not in DISCARD:
        raise CliError(f"Invalid discard mode `{a.discard}'")
    c.discard = DISCARD[a.discard]
    if a.detect_zeroes not in DETECT_ZEROES:
        raise CliError(f"Failed to parse detect_zeroes mode: invalid parameter value: "
                       f"{a.detect_zeroes}")
    c.detect_zeroes = a.detect_zeroes
    if c.detect_zeroes == "unmap" and c.discard != "unmap":
        raise CliError("setting detect-zeroes to unmap is not allowed without setting "
                       "discard operation to unmap")
    c.force_share = a.force_share
    if c.force_share and not c.readonly:
        raise CliError("-U (force-share) can only be used with read-only exports (-r)")
    # TLS
    c.ssl_context = None
    from ..exports.nbd.tls import TLSConfigError, X509Creds, parse_object
    try:
        objects = {}
        for text in a.object:
            creds = X509Creds(parse_object(text))
            objects[creds.id] = creds
        if a.tls_creds is not None:
            creds = objects.get(a.tls_creds)
            if creds is None:
                raise TLSConfigError(f"No TLS credentials with id '{a.tls_creds}'")
            c.ssl_context = creds.server_context()
        elif objects:
            raise TLSConfigError("--object defines TLS credentials that no --tls-creds uses")
    except TLSConfigError as exc:
        raise CliError(str(exc)) from None
    return c


def _open(c: _Config):
    flags = (0 if c.readonly else O_RDWR) | c.cache.flags
    if c.force_share:
        flags |= O_FORCE_SHARE
    try:
        bs = open_node(c.filename, c.fmt, flags, {"discard": c.discard})
    except (BlockDriverError, OSError) as exc:
        raise CliError(open_error(c.filename, exc)) from None
    if bs.probed_raw and not c.readonly:
        print(PROBED_RAW_WARNING.format(c.filename), file=sys.stderr, flush=True)
    return bs


def _fork() -> int | None:
    """qemu-nbd's --fork: the parent returns only once the server listens
    (or has failed); returns the pipe the child signals readiness on."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        ready = b""
        try:
            ready = os.read(rfd, 1)
        finally:
            os.close(rfd)
        if ready != b"1":
            os.waitpid(pid, 0)
        # The child reported its own error; the parent has nothing to flush.
        os._exit(0 if ready == b"1" else 1)
    os.close(rfd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    return wfd


def run(argv: list[str]) -> int:
    c = parse(argv)
    ready_fd = _fork() if c.fork else None
    from ..exports.nbd import Export, ExportOptions
    bs = _open(c)
    try:
        export = Export(bs, ExportOptions(
            name=c.name, description=c.description, shared=c.shared,
            writethrough=c.cache.writethrough, detect_zeroes=c.detect_zeroes,
            allocation_depth=c.depth))
        log = (lambda msg: report(f"nbd: {msg}")) if c.verbose else None
        status = asyncio.run(_serve(c, export, log, ready_fd))
    except BaseException:
        try:
            bs.close()
        except BlockDriverError:
            pass
        raise
    try:
        bs.close()                  # flushed, locks released
    except BlockDriverError as exc:
        raise CliError(f"Failed to close '{c.filename}': {exc.message}") from None
    return status


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _serve(c: _Config, export, log, ready_fd: int | None) -> int:
    from ..exports.nbd.server import HANDSHAKE_TIMEOUT, NBDServer
    # The environment may shorten the handshake limit (tests do).
    timeout = float(os.environ.get("BLOCKDRV_NBD_HANDSHAKE_TIMEOUT") or HANDSHAKE_TIMEOUT)
    server = NBDServer(export, ssl_context=c.ssl_context, persistent=c.persistent,
                       max_clients=c.shared, handshake_timeout=timeout, log=log)
    try:
        if c.socket is not None:
            server.listen_unix(c.socket)
        else:
            server.listen_tcp(c.bind, c.port)
    except OSError as exc:
        where = c.socket if c.socket is not None else f"{c.bind}:{c.port}"
        raise CliError(f"Failed to listen on {where}: {exc.strerror or exc}") from None
    pid_written = False
    try:
        if c.pid_file:
            try:
                with open(c.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
                pid_written = True
            except OSError as exc:
                raise CliError(f"Failed to write pid file '{c.pid_file}': "
                               f"{exc.strerror}") from None
        loop = asyncio.get_running_loop()

        def on_signal(signum, frame) -> None:
            loop.call_soon_threadsafe(lambda: loop.create_task(server.shutdown()))
        # Plain handlers, not loop.add_signal_handler: the loop restores the
        # default action (death) when its handlers are removed or it closes,
        # and a signal in that window would kill the process mid-close.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, on_signal)
        if log:
            log(f"serving '{c.filename}' ({export.bs.format_name}, {export.size} bytes"
                f"{', read-only' if export.readonly else ''}) as '{export.name}' on "
                f"{server.address}")
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
            ready_fd = None
        await server.serve()
        if log:
            log(f"stopped; {len(server.stats)} clients, max {server.max_inflight_seen} "
                "requests in flight per client")
    finally:
        await server.shutdown()
        # From here on a signal must not kill the process half-way through
        # closing the image: the close below flushes and unlocks it anyway.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if pid_written:
            try:
                os.unlink(c.pid_file)
            except OSError:
                pass
    return 0
