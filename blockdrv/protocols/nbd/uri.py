"""NBD addresses as qemu spells them.

URIs (qemu's ``nbd_parse_uri``)::

    nbd://HOST[:PORT]/[EXPORT]          TCP, port 10809 by default
    nbd+tcp://HOST[:PORT]/[EXPORT]      the same
    nbd+unix:///[EXPORT]?socket=PATH    a unix socket (no host)
    nbds://..., nbds+tcp://..., nbds+unix://...   TLS (refused: not supported yet)

The export name is the path without its leading slash, percent-decoded; an
empty path is the default export ``""``.  A TCP URI takes no query, a unix
one exactly ``socket=``.  qemu's legacy pseudo-protocol is accepted too::

    nbd:unix:PATH[:exportname=NAME]
    nbd:HOST[:PORT][:exportname=NAME]
"""

from __future__ import annotations

from blockdrv._startup import dataclass

from ...errors import InvalidArgumentError, UnsupportedError

DEFAULT_PORT = 10809
MAX_EXPORT_NAME = 4096             # the standard's NBD_MAX_STRING

SCHEMES = ("nbd", "nbd+tcp", "nbd+unix", "nbds", "nbds+tcp", "nbds+unix")


@dataclass(frozen=True)
class Address:
    export: str = ""
    path: str | None = None        # unix socket
    host: str | None = None        # TCP
    port: int = DEFAULT_PORT

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def _bad(filename: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"Invalid NBD address '{filename}': {why}")


def _check_export(filename: str, export: str) -> str:
    if len(export.encode()) > MAX_EXPORT_NAME:
        raise _bad(filename, f"export name longer than {MAX_EXPORT_NAME} bytes")
    if "\0" in export:
        raise _bad(filename, "export name contains NUL")
    return export


def _port(filename: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _bad(filename, f"invalid port '{text}'")
    return int(text)


def parse_uri(filename: str) -> Address:
    try:
        from urllib.parse import parse_qsl, unquote, urlsplit   # not at start-up: ~20 ms
        parts = urlsplit(filename)
    except ValueError as exc:
        raise _bad(filename, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(filename, f"unknown scheme '{parts.scheme}'")
    if scheme.startswith("nbds"):
        raise UnsupportedError(
            "NBD over TLS (nbds://) is not supported by blockdrv's NBD client yet")
    if parts.fragment:
        raise _bad(filename, "a fragment is not allowed")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    export = _check_export(filename, export)
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _bad(filename, f"malformed query '{parts.query}'") from None
    if scheme == "nbd+unix":
        if parts.netloc:
            raise _bad(filename, "a unix socket URI takes no host (nbd+unix:///EXPORT?socket=PATH)")
        if len(query) != 1 or query[0][0] != "socket" or not query[0][1]:
            raise _bad(filename, "a unix socket URI takes exactly one query parameter, "
                                 "socket=PATH")
        return Address(export=export, path=query[0][1])
    if query:
        raise _bad(filename, "a TCP URI takes no query parameters")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise _bad(filename, str(exc)) from None
    if not host:
        raise _bad(filename, "no host (nbd://HOST[:PORT]/EXPORT)")
    if parts.username or parts.password:
        raise _bad(filename, "user information is not allowed")
    return Address(export=export, host=host, port=port or DEFAULT_PORT)


def parse_legacy(filename: str, rest: str) -> Address:
    """``rest`` is what follows ``nbd:``."""
    export = ""
    head, sep, name = rest.partition(":exportname=")
    if sep:
        export = _check_export(filename, name)
    if head.startswith("unix:"):
        path = head[5:]
        if not path:
            raise _bad(filename, "no socket path (nbd:unix:PATH[:exportname=NAME])")
        return Address(export=export, path=path)
    if head.startswith("["):
        host, sep, tail = head[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise _bad(filename, "malformed IPv6 address")
        port = _port(filename, tail[1:]) if tail else DEFAULT_PORT
    else:
        host, sep, port_text = head.partition(":")
        port = _port(filename, port_text) if sep else DEFAULT_PORT
    if not host:
        raise _bad(filename, "no host (nbd:HOST[:PORT][:exportname=NAME])")
    return Address(export=export, host=host, port=port)


def parse(filename: str) -> Address:
    """The address named by an ``nbd...://`` URI or a legacy ``nbd:`` string."""
    scheme, sep, _ = filename.partition("://")
    if sep and scheme.lower() in SCHEMES:
        return parse_uri(filename)
    if filename.startswith("nbd:"):
        return parse_legacy(filename, filename[4:])
    raise _bad(filename, "expected nbd://HOST[:PORT]/EXPORT, "
                         "nbd+unix:///EXPORT?socket=PATH or nbd:unix:PATH")
