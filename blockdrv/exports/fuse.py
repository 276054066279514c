"""The FUSE export: an image's guest disk as one regular file, in the shape
of qemu-storage-daemon's FUSE export (``--export fuse,mountpoint=FILE``).

The mount point is an existing regular file, which the mount covers: the
file system is that single file (the root of the mount), ``size`` bytes,
read-write unless the export is read-only.  Requests are served on one
thread (blockdrv's nodes are not thread-safe), through the open image, so
its locks keep other writers out while it is mounted.

* read/write: the guest disk's bytes; a write past the end fails (ENOSPC),
  ``truncate`` to another size fails (EINVAL): a disk does not grow.
* fallocate: PUNCH_HOLE (with KEEP_SIZE, as the kernel requires) zeroes the
  range and lets the format deallocate it (write-zeroes with unmap: reads
  return zeros afterwards, as punch-hole promises); ZERO_RANGE zeroes it;
  plain allocation is EOPNOTSUPP, as in QEMU.
* lseek SEEK_DATA/SEEK_HOLE: answered from block status (data is what the
  chain reports as DATA), as in QEMU's export.
* flush (every close(2)), fsync and release flush the image.

The binding is mfusepy (ctypes over the system's libfuse3); it is imported
by :func:`load_binding`, never at package import time.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
import time
from typing import Any, Callable

from ..errors import BlockDriverError, UnsupportedError
from ..fileobj import seek_data_hole

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 64 << 20          # one write-zeroes request at most (bounded work)


class FuseUnavailable(UnsupportedError):
    """The FUSE binding or the kernel side is missing; the message says what
    to install."""


def load_binding():
    """Import mfusepy against libfuse3 (mfusepy prefers libfuse2 when both
    are installed; lseek and the file-info argument need 3)."""
    import ctypes.util
    try:
        if not (os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME")):
            path = ctypes.util.find_library("fuse3")
            if path is not None:
                os.environ["FUSE_LIBRARY_PATH"] = path
                try:
                    import mfusepy
                finally:
                    del os.environ["FUSE_LIBRARY_PATH"]
                return mfusepy
        import mfusepy
        return mfusepy
    except ImportError as exc:
        raise FuseUnavailable("the FUSE export needs mfusepy: pip install 'blockdrv[fuse]' "
                              f"({exc})") from None
    except (OSError, AttributeError) as exc:
        raise FuseUnavailable(f"libfuse3 is not usable: {exc} (apt-get install fuse3)") \
            from None


def check_fuse_device() -> None:
    """Fail early, in one line, when /dev/fuse cannot be opened (libfuse
    would otherwise print its own lines)."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise FuseUnavailable(f"cannot open /dev/fuse: {exc.strerror} (is the fuse module "
                              "loaded, and the device passed to this container?)") from None
    os.close(fd)


def check_mountpoint(path: str) -> None:
    """qemu's FUSE export mounts over an existing regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnsupportedError(f"Failed to stat '{path}': {exc.strerror}",
                               errno=exc.errno, filename=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedError(f"'{path}' is not a regular file: the FUSE export mounts "
                               "the disk over an existing regular file (create it with "
                               "'touch')", errno=errno.EINVAL, filename=path)


def _guarded(func: Callable) -> Callable:
    """A request's errors become its errno: block errors and host errors
    carry theirs; anything else is a bug, reported on one line (never a
    traceback) and answered EIO."""
    @functools.wraps(func)
    def call(self, *args, **kwargs):
        try:
            return func(self, *args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug costs this request only
            print(f"blockdrv fuse: internal error in {func.__name__}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
    return call


class DiskFile:
    """mfusepy operations: the one file at the mount's root."""

    use_ns = True           # times in nanoseconds (mfusepy's modern API)

    def __init__(self, image, log: Callable[[str], Any] | None = None) -> None:
        self.image = image
        self.size = image.size
        self.writable = not image.readonly
        self.log = log
        now = time.time_ns()
        try:
            st = os.stat(image.filename) if image.filename else None
        except OSError:
            st = None
        self.atime = st.st_atime_ns if st else now
        self.mtime = st.st_mtime_ns if st else now
        self.ctime = st.st_ctime_ns if st else now
        self.uid, self.gid = os.getuid(), os.getgid()
        self.opened = 0

    def _root(self, path: str | None) -> None:
        if path not in (None, "/"):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def _writable(self) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # -- attributes -------------------------------------------------------------

    @_guarded
    def getattr(self, path, fh=None) -> dict:
        self._root(path)
        try:
            allocated = self.image.bs.get_allocated_file_size()
        except (BlockDriverError, AttributeError):
            allocated = None
        if allocated is None or allocated < 0:
            allocated = self.size
        return {
            "st_mode": stat.S_IFREG | (0o644 if self.writable else 0o444),
            "st_nlink": 1, "st_size": self.size, "st_uid": self.uid, "st_gid": self.gid,
            "st_blocks": (allocated + 511) // 512, "st_blksize": 4096,
            "st_atime": self.atime, "st_mtime": self.mtime, "st_ctime": self.ctime,
        }

    @_guarded
    def utimens(self, path, times=None) -> int:
        self._root(path)
        now = time.time_ns()
        self.atime, self.mtime = times if times else (now, now)
        self.ctime = now
        return 0

    @_guarded
    def truncate(self, path, length, fh=None) -> int:
        self._root(path)
        if length == self.size:
            return 0            # no change: nothing refused
        self._writable()        # (so open(O_TRUNC) fails: use conv=notrunc, "r+b")
        raise OSError(errno.EINVAL, "a disk image's size is fixed")

    @_guarded
    def statfs(self, path) -> dict:
        return {"f_bsize": 4096, "f_frsize": 512, "f_blocks": self.size // 512,
                "f_bfree": 0, "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}

    # -- open and close -----------------------------------------------------------

    @_guarded
    def open(self, path, flags) -> int:
        self._root(path)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable()
        self.opened += 1
        return 0

    @_guarded
    def flush(self, path, fh) -> int:
        if self.writable:
            self.image.flush()
        return 0

    @_guarded
    def fsync(self, path, datasync, fh) -> int:
        if self.writable:
            self.image.flush()
        return 0

    @_guarded
    def release(self, path, fh) -> int:
        self.opened -= 1
        if self.writable:
            self.image.flush()
        return 0

    # -- I/O -------------------------------------------------------------------------

    @_guarded
    def read(self, path, size, offset, fh) -> bytes:
        n = max(0, min(size, self.size - offset))
        return self.image.read(offset, n) if n else b""

    @_guarded
    def write(self, path, data, offset, fh) -> int:
        self._writable()
        n = min(len(data), self.size - offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "write beyond the end of the disk")
        self.image.write(offset, memoryview(data)[:n])
        self.mtime = self.ctime = time.time_ns()
        return n

    @_guarded
    def fallocate(self, path, mode, offset, length, fh) -> int:
        self._writable()
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        end = offset + length
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            unmap = True
        elif mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            if end > self.size and not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.ENOSPC, "a disk does not grow")
            unmap = False
        else:
            # plain allocation: nothing can be reserved in advance (QEMU's answer)
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        pos, end = offset, min(end, self.size)
        while pos < end:
            n = min(end - pos, _ZERO_CHUNK)
            self.image.write_zeroes(pos, n, unmap=unmap)
            pos += n
        self.mtime = self.ctime = time.time_ns()
        return 0

    @_guarded
    def lseek(self, path, offset, whence, fh) -> int:
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            return seek_data_hole(self.image, offset, whence)
        # SEEK_SET/CUR/END never reach the daemon (the kernel answers them)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def serve(image, mountpoint: str, *, readonly: bool, fsname: str = "blockdrv",
          log: Callable[[str], Any] | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve until unmounted
    (``fusermount3 -u``) or SIGTERM/SIGINT/SIGHUP (libfuse's handlers end
    the loop and unmount).  The caller closes the image afterwards."""
    mfusepy = load_binding()
    import logging
    # mfusepy logs a request's unexpected exception with its traceback; ours
    # are reported in one line by _guarded, so keep its logger quiet
    logging.getLogger("fuse").setLevel(logging.CRITICAL)

    class _FUSE(mfusepy.FUSE):
        # mfusepy has the libfuse3 lseek slot but no wrapper for it
        def lseek(self, path, offset, whence, fip):
            fh = fip.contents.fh if fip else None
            return self.operations.lseek(
                None if path is None else path.decode(self.encoding, self.errors),
                offset, whence, fh)

    import signal
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # libfuse installs its exit handlers only over SIG_DFL
        signal.signal(sig, signal.SIG_DFL)
    ops = DiskFile(image, log)
    safe_name = "".join(c if c.isalnum() or c in "._-/:" else "_" for c in fsname)
    options: dict[str, Any] = {"foreground": True, "nothreads": True,
                               "fsname": safe_name, "subtype": "blockdrv"}
    if readonly:
        options["ro"] = True
    try:
        _FUSE(ops, mountpoint, **options)
    except RuntimeError as exc:
        # fuse_main's status: 1-6 setup failed (options, fuse_new, mount,
        # signal handlers), nothing served; 7/8: the loop ran and ended with
        # an error, which is how libfuse >= 3.10 reports a stop by SIGTERM/
        # SIGINT (the signal number is the loop's error): a normal end.
        status = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
        if status not in (7, 8):
            raise BlockDriverError(f"Failed to mount the FUSE export at '{mountpoint}' "
                                   f"(libfuse status {status})", filename=mountpoint) \
                from None
