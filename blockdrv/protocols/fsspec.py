"""The ``fsspec`` protocol: read-only images anywhere fsspec reaches.

``blockdrv info https://host/disk.vhdx`` (HTTP range reads), ``s3://bucket/key``
(s3fs, ``pip install 'blockdrv[s3]'``), ``az://container/blob`` (adlfs,
``blockdrv[azure]``), ``memory://name`` (fsspec's in-process filesystem) and
``file:///path``.  fsspec itself comes with ``blockdrv[fsspec]``; it is
imported on the first open, never at start-up.

Read-only: opening for writing is refused.  The size is ``fs.info``'s; block
status is all data (object stores say nothing about holes).  A server must
honour HTTP Range requests (a whole-file download is never done).  Open options
(``file={...}`` under a format node, ``open_image(url, file={...})``):

``readahead``   bytes fetched past each read (fsspec's ``block_size``), qemu
                size syntax or int, default 1M (0 < n <= 256M);
``cache_type``  fsspec cache: ``readahead`` (default: one window of
                request + readahead bytes), ``blockcache`` (an LRU of
                ``cache_blocks`` blocks of ``readahead`` bytes, for random
                access) or ``none``; the unbounded ones are refused;
``cache_blocks`` blocks kept by ``blockcache`` (default 32, at most 1024);
``storage_options`` a dict passed to the fsspec filesystem (credentials,
                endpoints: ``{"anon": True}`` for public S3 buckets).

No locks are taken: the store owns the object.  I/O is synchronous (fsspec's
own event loop thread does the async HTTP under it).
"""

from __future__ import annotations

import errno
import os
import threading

from ..common import BLOCK_DATA, BLOCK_OFFSET_VALID, O_RDWR, BlockStatus
from ..errors import (BlockDriverError, BlockIOError, InvalidArgumentError, ReadOnlyError,
                      UnsupportedError)
from ..hookspecs import hookimpl
from ..iov import IOVector
from ..options import parse_size

SCHEMES = ("http", "https", "s3", "s3a", "az", "abfs", "abfss", "gs", "gcs",
           "memory", "file")
CACHE_TYPES = ("readahead", "blockcache", "none")
DEFAULT_READAHEAD = 1 << 20
MAX_READAHEAD = 256 << 20
MAX_CACHE_BLOCKS = 1024

_EXTRA = {"s3": "s3", "s3a": "s3", "az": "azure", "abfs": "azure", "abfss": "azure"}
_PACKAGE = {"s3": "s3fs", "azure": "adlfs", "gs": "gcsfs", "gcs": "gcsfs"}


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _error(exc: BaseException, url: str) -> BlockDriverError:
    """One line for whatever fsspec or its backend raised."""
    if isinstance(exc, BlockDriverError):
        return exc
    if isinstance(exc, ImportError):
        scheme = _scheme(url)
        extra = _EXTRA.get(scheme)
        package = _PACKAGE.get(extra or scheme, "its fsspec backend")
        hint = f" (pip install 'blockdrv[{extra}]')" if extra else ""
        return UnsupportedError(f"{scheme}:// needs {package}{hint}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'not installed'}")
    if isinstance(exc, FileNotFoundError):
        # fsspec's HTTP filesystem turns every failure of its HEAD/GET into
        # FileNotFoundError; the cause says what really happened.
        cause = exc.__cause__ or exc.__context__
        if cause is not None and not isinstance(cause, FileNotFoundError):
            return _error(cause, url)
        return InvalidArgumentError("Not found", errno=errno.ENOENT)
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:         # aiohttp's ClientResponseError
        reason = getattr(exc, "message", "") or ""
        code = {404: errno.ENOENT, 401: errno.EACCES, 403: errno.EACCES}.get(status, errno.EIO)
        return BlockIOError(f"HTTP error {status} {reason}".strip(), errno=code)
    os_error = getattr(exc, "os_error", None)                # aiohttp's ClientConnectorError
    if isinstance(os_error, OSError) and getattr(exc, "host", None):
        return BlockIOError(f"Failed to connect to '{exc.host}:{exc.port}': "
                            f"{os.strerror(os_error.errno) if os_error.errno else os_error}",
                            errno=os_error.errno or errno.EIO)
    if isinstance(exc, PermissionError):
        return ReadOnlyError("Permission denied", errno=errno.EACCES)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError):
        return BlockIOError(text, errno=exc.errno if isinstance(exc.errno, int) and exc.errno
                            else errno.EIO)
    return BlockIOError(text)


def _options(options) -> tuple[int, str, int, dict]:
    try:
        readahead = parse_size(options.get("readahead", DEFAULT_READAHEAD))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"Invalid readahead: {exc.message}") from None
    if not 0 < readahead <= MAX_READAHEAD:
        raise InvalidArgumentError(f"readahead must be between 1 and {MAX_READAHEAD} bytes")
    cache_type = str(options.get("cache_type", "readahead"))
    if cache_type not in CACHE_TYPES:
        raise InvalidArgumentError(f"Invalid cache_type '{cache_type}' "
                                   f"(one of {', '.join(CACHE_TYPES)})")
    try:
        blocks = int(options.get("cache_blocks", 32))
    except (TypeError, ValueError):
        blocks = -1
    if not 0 < blocks <= MAX_CACHE_BLOCKS:
        raise InvalidArgumentError(f"cache_blocks must be between 1 and {MAX_CACHE_BLOCKS}")
    storage = options.get("storage_options") or {}
    if not isinstance(storage, dict):
        raise InvalidArgumentError("storage_options must be a dict")
    return readahead, cache_type, blocks, storage


class _State:
    def __init__(self, fs, path: str, f) -> None:
        self.fs, self.path, self.f = fs, path, f
        self.lock = threading.Lock()


class FsspecProtocol:
    protocol_name = "fsspec"
    format_name = None
    # claimed by blockdrv.block.split_protocol
    uri_schemes = SCHEMES

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        url = bs.filename or ""
        scheme = _scheme(url)
        if options.get("create") or flags & O_RDWR:
            raise ReadOnlyError(f"The fsspec protocol is read-only: {scheme}:// images "
                                "cannot be opened for writing", errno=errno.EROFS)
        readahead, cache_type, blocks, storage = _options(options)
        try:
            import fsspec
        except ImportError:
            raise UnsupportedError("Remote images need fsspec "
                                   "(pip install 'blockdrv[fsspec]')") from None
        f = None
        try:
            fs, path = fsspec.core.url_to_fs(url, **storage)
            info = fs.info(path)
            size = info.get("size")
            if info.get("type", "file") != "file":
                raise InvalidArgumentError(f"Not a file (an fsspec {info.get('type')})")
            if size is None:
                raise BlockIOError("The server does not report the image's size")
            if info.get("partial", True) is False:
                # fsspec's HTTP filesystem: "Accept-Ranges: none"
                raise UnsupportedError("The HTTP server does not accept range requests")
            kwargs = {"block_size": readahead, "cache_type": cache_type}
            if cache_type == "blockcache":
                kwargs["cache_options"] = {"maxblocks": blocks}
            f = fs.open(path, "rb", **kwargs)
        except Exception as exc:   # fsspec and its backends raise anything
            if f is not None:
                f.close()
            raise _error(exc, url) from None
        bs.opaque = _State(fs, path, f)
        bs.total_size = int(size)

    @hookimpl
    def bdrv_close(self, bs) -> None:
        st: _State | None = bs.opaque
        if st is not None:
            try:
                st.f.close()
            except Exception:       # closing a read-only remote file: nothing to lose
                pass

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        st: _State = bs.opaque
        try:
            with st.lock:
                st.f.seek(offset)
                data = st.f.read(nbytes)
        except Exception as exc:
            raise _error(exc, bs.filename or "") from None
        if len(data) != nbytes:
            # the object shrank under us, or the server answered short
            raise BlockIOError(f"Short read: {len(data)} of {nbytes} bytes at {offset}")
        qiov.scatter(0, data)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, bs)

    @hookimpl
    def bdrv_get_allocated_file_size(self, bs) -> int:
        return -1               # unknown: info says "disk size: unavailable"


driver = FsspecProtocol()
