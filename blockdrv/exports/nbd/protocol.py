"""The NBD wire format (NetworkBlockDevice/nbd ``doc/proto.md``).

Constants carry the standard's names without the ``NBD_`` prefix.  Every
number on the wire is big-endian.  Nothing here does I/O: the server reads
and writes the byte strings these helpers build and parse.
"""

from __future__ import annotations

import errno as _errno
import struct

# -- handshake ------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0         # client flags
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (sent with the export's size) -------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- requests and replies -----------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- errors: the standard's small errno set ------------------------------------------------

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    _errno.EPERM: EPERM, _errno.EACCES: EPERM, _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL, _errno.ENOENT: EINVAL,
    _errno.ENOSPC: ENOSPC, _errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP, _errno.EOPNOTSUPP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> int:
    """The NBD error for a host errno (anything unlisted is EIO)."""
    return _ERRNO_TO_NBD.get(host_errno or _errno.EIO, EIO)


# -- sizes ---------------------------------------------------------------------------------

# Largest read or write payload we accept (and advertise as the maximum block
# size): the standard's "SHOULD NOT be considered a denial of service" bound.
MAX_PAYLOAD = 32 << 20
MAX_STRING = 4096                       # export names, descriptions, queries
MAX_OPTION_DATA = 64 << 10              # larger option payloads end the session

# -- structures -----------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")         # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")           # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")    # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")       # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")     # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")          # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_string(kind: int, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool = True) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind,
                      cookie, length)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload)) + payload


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool) -> bytes:
    payload = U32.pack(context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), done) + payload


class Malformed(Exception):
    """Option data that does not parse (answered with ``REP_ERR_INVALID``)."""


class Cursor:
    """Reads the fields of one option's data, refusing to run past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Malformed("option data is shorter than its fields say")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def string(self, length: int) -> str:
        if length > MAX_STRING:
            raise Malformed(f"string of {length} bytes is longer than {MAX_STRING}")
        raw = self.take(length)
        if b"\0" in raw:
            raise Malformed("string contains NUL")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise Malformed("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Malformed("option data is longer than its fields say")
