"""``blockdrv fuse``: the guest disk mounted over a regular file through the
kernel's FUSE, exercised with real I/O (Python file I/O, dd, fallocate,
lseek, mkfs.ext4, e2fsck) and checked afterwards through blockdrv and
qemu-img.  Skipped only when /dev/fuse is unusable and not under CI."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

import blockdrv
from blockdrv.testing.tools import in_ci

from .conftest import bd_env, blockdrv_cmd

MiB = 1 << 20
pytestmark = pytest.mark.interop


def _fuse_unusable() -> str | None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse is unusable: {exc.strerror}"
    os.close(fd)
    try:
        from blockdrv.exports.fuse import load_binding
        load_binding()
    except OSError as exc:
        return str(exc)
    return None


_REASON = _fuse_unusable()
if _REASON is not None:
    if in_ci():
        raise RuntimeError(f"CI=true but the FUSE export cannot run: {_REASON}")
    pytestmark = [pytestmark, pytest.mark.skip(reason=_REASON)]


def _mounted(path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")
    if path is None:
        if in_ci():
            pytest.fail(f"CI=true but {name} is missing")
        pytest.skip(f"{name} is not installed")
    return path


class Mount:
    """A running ``blockdrv fuse``; :meth:`stop` (always called by the
    fixture) signals it, waits, and unmounts lazily if it had to kill it."""

    def __init__(self, tmp, image, *args: str, timeout: float = 20.0) -> None:
        self.point = tmp / f"disk-{id(self)}"
        self.point.touch()
        self.image = image
        self.log = tmp / f"fuse-{id(self)}.log"
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(blockdrv_cmd("fuse", *args, str(image), str(self.point)),
                                     stdout=subprocess.DEVNULL, stderr=self._logf,
                                     env=bd_env())
        deadline = time.monotonic() + timeout
        while not _mounted(self.point):
            if self.proc.poll() is not None:
                raise AssertionError(f"blockdrv fuse exited {self.proc.returncode}: "
                                     f"{self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"not mounted after {timeout}s: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text()

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20.0) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        if _mounted(self.point):
            subprocess.run(["fusermount3", "-u", "-z", str(self.point)], timeout=20,
                           capture_output=True)
            if _mounted(self.point):
                subprocess.run(["umount", "-l", str(self.point)], timeout=20,
                               capture_output=True)
        self._logf.close()
        return rc


@pytest.fixture
def fuse_mount(tmp_path):
    mounts: list[Mount] = []

    def start(image, *args):
        m = Mount(tmp_path, image, *args)
        mounts.append(m)
        return m
    yield start
    for m in mounts:
        m.stop()


def _pattern(n: int, seed: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def _vhdx(tmp_path, size=64 * MiB, name="disk.vhdx"):
    path = tmp_path / name
    blockdrv.create_image(path, "vhdx", size, block_size="1M").close()
    return path


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return 0 if libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def test_read_write_through_the_kernel(tmp_path, fuse_mount):
    image = _vhdx(tmp_path)
    before = _pattern(1 * MiB, 1)
    with blockdrv.open_image(image, readonly=False) as img:
        img.write(10 * MiB, before)
    m = fuse_mount(image, "-f", "vhdx")
    st = os.stat(m.point)
    assert st.st_size == 64 * MiB and st.st_mode & 0o777 == 0o644
    # what blockdrv wrote, read through the kernel
    with open(m.point, "rb") as f:
        f.seek(10 * MiB)
        assert f.read(len(before)) == before
    # dd and Python writes through the kernel (no O_TRUNC: a disk's size is fixed)
    src = tmp_path / "src"
    dd_data = _pattern(3 * MiB, 2)
    src.write_bytes(dd_data)
    subprocess.run(["dd", f"if={src}", f"of={m.point}", "bs=64k", "seek=320",
                    "conv=notrunc,fsync", "status=none"], check=True, timeout=60)
    py_data = _pattern(123_457, 3)
    with open(m.point, "r+b") as f:
        f.seek(30 * MiB + 4097)
        f.write(py_data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(m.point, os.O_RDWR)
    try:
        # punch a hole in the middle of the dd range: reads zeros afterwards
        assert _fallocate(fd, 0x01 | 0x02, 21 * MiB, MiB) == 0
        assert os.pread(fd, MiB, 21 * MiB) == bytes(MiB)
        assert _fallocate(fd, 0x10 | 0x01, 22 * MiB, 4096) == 0      # ZERO_RANGE
        assert _fallocate(fd, 0, 0, 4096) == errno.EOPNOTSUPP        # plain allocation
        # SEEK_DATA/SEEK_HOLE follow the image's allocation (1 MiB blocks)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 11 * MiB
        assert os.lseek(fd, 11 * MiB, os.SEEK_DATA) == 20 * MiB
        # the punched block reads zeros; whether it became a hole is the
        # format's business (blockdrv's VHDX, like qemu's, writes the zeros)
        assert os.lseek(fd, 20 * MiB, os.SEEK_HOLE) in (21 * MiB, 23 * MiB)
        # the Python write's block: data from its start, or from the first
        # sector that is not known to read as zeros
        data = os.lseek(fd, 23 * MiB, os.SEEK_DATA)
        assert 30 * MiB <= data <= 30 * MiB + 4097
        end = 30 * MiB + 4097 + len(py_data)
        assert end <= os.lseek(fd, data, os.SEEK_HOLE) <= 31 * MiB
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 31 * MiB, os.SEEK_DATA)                       # nothing after
        assert exc.value.errno == errno.ENXIO
        # a disk does not grow
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", 64 * MiB)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, MiB)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert os.stat(m.point).st_size == 64 * MiB
    # the image is locked while mounted
    with pytest.raises(blockdrv.PermissionConflictError):
        blockdrv.open_image(image, readonly=False)
    assert m.stop(signal.SIGTERM) == 0, m.stderr()
    assert not _mounted(m.point) and m.stderr() == ""
    # afterwards, through blockdrv: every write is in the image, flushed, unlocked
    expect = bytearray(64 * MiB)
    expect[10 * MiB:11 * MiB] = before
    expect[20 * MiB:23 * MiB] = dd_data
    expect[21 * MiB:22 * MiB] = bytes(MiB)
    expect[22 * MiB:22 * MiB + 4096] = bytes(4096)
    expect[30 * MiB + 4097:30 * MiB + 4097 + len(py_data)] = py_data
    with blockdrv.open(image, "r+b") as f:          # the lock was released
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(expect).digest()
    assert blockdrv.check(image).corruptions == 0
    if shutil.which("qemu-img"):                   # and as qemu reads it
        raw = tmp_path / "expect.raw"
        raw.write_bytes(expect)
        res = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(image),
                              str(raw)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


def test_punch_hole_deallocates(tmp_path, fuse_mount):
    """On a format that deallocates (raw over a sparse host file), a punched
    hole through the mount frees the host blocks and SEEK_HOLE sees it."""
    image = tmp_path / "disk.raw"
    blockdrv.create_image(image, "raw", 8 * MiB).close()
    m = fuse_mount(image, "-f", "raw")
    fd = os.open(m.point, os.O_RDWR)
    try:
        os.pwrite(fd, _pattern(4 * MiB, 5), 2 * MiB)
        os.fsync(fd)
        used = os.stat(image).st_blocks
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 6 * MiB
        assert _fallocate(fd, 0x01 | 0x02, 3 * MiB, MiB) == 0
        assert os.pread(fd, MiB, 3 * MiB) == bytes(MiB)
        assert os.stat(image).st_blocks <= used - (MiB // 512) + 8     # freed on the host
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 3 * MiB
        assert os.lseek(fd, 3 * MiB, os.SEEK_DATA) == 4 * MiB
    finally:
        os.close(fd)
    assert m.stop() == 0, m.stderr()


def test_read_only_export_and_sigint(tmp_path, fuse_mount):
    image = _vhdx(tmp_path, size=8 * MiB)
    m = fuse_mount(image, "-r", "-U")
    assert os.stat(m.point).st_mode & 0o777 == 0o444
    with pytest.raises(OSError) as exc:
        os.open(m.point, os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with open(m.point, "rb") as f:
        assert f.read() == bytes(8 * MiB)
    # -U: a writer may open the image while it is exported read-only
    with blockdrv.open_image(image, readonly=False) as img:
        img.write(0, b"late")
    assert m.stop(signal.SIGINT) == 0, m.stderr()
    assert not _mounted(m.point)


def test_mkfs_and_e2fsck_through_the_mount(tmp_path, fuse_mount):
    """mkfs.ext4 formats the disk through the mount, e2fsck checks it there;
    'fusermount3 -u' ends the export; qemu-img and e2fsck then agree the
    filesystem is in the VHDX."""
    mkfs, e2fsck = _tool("mkfs.ext4"), _tool("e2fsck")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_bytes(b"written through FUSE\n")
    (tree / "big").write_bytes(_pattern(5 * MiB, 9))
    image = _vhdx(tmp_path, size=48 * MiB)
    m = fuse_mount(image)
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", "-E", "nodiscard", "-d", str(tree),
                    str(m.point)], check=True, timeout=300, capture_output=True)
    res = subprocess.run([e2fsck, "-fn", str(m.point)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    subprocess.run(["fusermount3", "-u", str(m.point)], check=True, timeout=30)
    assert m.stop(sig=None) == 0, m.stderr()         # exits by itself, status 0
    with blockdrv.open(image, "r+b"):                # flushed and unlocked
        pass
    raw = tmp_path / "out.raw"
    blockdrv.convert(image, raw, fmt="raw")
    res = subprocess.run([e2fsck, "-fn", str(raw)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/sbin:/usr/sbin")
    if debugfs:
        out = subprocess.run([debugfs, "-R", "cat /etc/motd", str(raw)], capture_output=True,
                             timeout=60).stdout
        assert out == b"written through FUSE\n"


def test_e2fsck_on_a_converted_filesystem(tmp_path, fuse_mount):
    """An ext4 made by mkfs.ext4 on a raw file, converted into a VHDX by
    blockdrv, checked by e2fsck through a read-only mount (no loop device:
    e2fsck runs on the regular file)."""
    mkfs, e2fsck = _tool("mkfs.ext4"), _tool("e2fsck")
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(40 * MiB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data.bin").write_bytes(_pattern(2 * MiB + 5, 4))
    subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(raw)], check=True, timeout=120,
                   capture_output=True)
    image = tmp_path / "fs.vhdx"
    blockdrv.convert(raw, image, fmt="vhdx", src_fmt="raw")
    m = fuse_mount(image, "-r", "-f", "vhdx")
    res = subprocess.run([e2fsck, "-fn", str(m.point)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "clean" in res.stdout or "files" in res.stdout
    with open(m.point, "rb") as f, open(raw, "rb") as g:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(g.read()).digest()
    assert m.stop() == 0


@pytest.mark.parametrize("case", ["missing-mountpoint", "directory-mountpoint",
                                  "missing-image", "force-share-rw", "locked"])
def test_errors_are_one_line(tmp_path, fuse_mount, case):
    image = _vhdx(tmp_path, size=4 * MiB)
    point = tmp_path / "point"
    point.touch()
    args = [str(image), str(point)]
    expect = ""
    if case == "missing-mountpoint":
        args[1] = str(tmp_path / "nope")
        expect = "Failed to stat"
    elif case == "directory-mountpoint":
        args[1] = str(tmp_path)
        expect = "is not a regular file"
    elif case == "missing-image":
        args[0] = str(tmp_path / "missing.vhdx")
        expect = "Could not open"
    elif case == "force-share-rw":
        args[:0] = ["-U"]
        expect = "-U (force-share) can only be used with read-only exports"
    elif case == "locked":
        fuse_mount(image)
        expect = 'Failed to get "write" lock'
    res = subprocess.run(blockdrv_cmd("fuse", *args), capture_output=True, text=True,
                         env=bd_env(), timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert not _mounted(point)
