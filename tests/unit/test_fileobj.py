"""``blockdrv.open``: images as Python binary file objects (gzip.open's shape),
with OSError subclasses for errors, a disk's fixed size, SEEK_DATA/SEEK_HOLE;
and the standard library's archive readers and a filesystem parser reading
from inside VHDX images through it."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import blockdrv
from blockdrv.errors import BlockDriverError, CorruptImageError, InvalidArgumentError
from blockdrv.testing.tools import in_ci

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vhdx(tmp_path, size=8 * MiB, name="disk.vhdx", **opts):
    path = tmp_path / name
    opts.setdefault("block_size", "1M")
    blockdrv.create_image(path, "vhdx", size, **opts).close()
    return path


def _pattern(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


# -- the stream ---------------------------------------------------------------------

def test_stream_shape_and_roundtrip(tmp_path):
    path = _vhdx(tmp_path)
    data = _pattern(300_000)
    with blockdrv.open(path, "r+b") as f:
        assert isinstance(f, io.BufferedRandom) and isinstance(f.raw, blockdrv.ImageIO)
        assert f.readable() and f.writable() and f.seekable()
        assert f.name == str(path) and f.raw.mode == "rb+"
        assert f.seek(0, io.SEEK_END) == 8 * MiB
        assert f.seek(1_000_003) == 1_000_003
        assert f.write(data) == len(data)
        assert f.tell() == 1_000_003 + len(data)
        f.seek(-len(data), io.SEEK_CUR)
        assert f.read(len(data)) == data          # through the buffer
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
    # what the stream wrote is in the image, as any reader of the image sees it
    with blockdrv.open_image(path) as img:
        assert img.read(1_000_003, len(data)) == data
        assert img.read(0, 4096) == bytes(4096)
    with blockdrv.open(path) as f:
        assert isinstance(f, io.BufferedReader) and not f.writable()
        f.seek(1_000_003)
        assert f.read(len(data)) == data
        f.seek(8 * MiB - 10)
        assert f.read(100) == bytes(10)            # short read at the end
        assert f.read(100) == b""                  # then EOF
        f.seek(9 * MiB)                            # past the end: allowed, empty
        assert f.read(1) == b""
        f.seek(0)
        whole = f.read()
        assert len(whole) == 8 * MiB and whole[1_000_003:1_000_003 + len(data)] == data
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
    assert f.closed and f.raw.closed


def test_unbuffered_and_modes(tmp_path):
    path = _vhdx(tmp_path)
    with blockdrv.open(path, "rb+", buffering=0) as raw:
        assert isinstance(raw, blockdrv.ImageIO)
        assert raw.write(b"abc") == 3
        buf = bytearray(3)
        raw.seek(0)
        assert raw.readinto(buf) == 3 and buf == b"abc"
        with pytest.raises(InvalidArgumentError) as exc:
            raw.seek(-1)
        assert exc.value.errno == errno.EINVAL and isinstance(exc.value, OSError)
    with blockdrv.open(path, "r") as f:        # "r" is binary, as in gzip.open
        assert f.read(3) == b"abc"
    for bad in ("wb", "ab", "xb", "w+b", "rt", "rb++", "b", "rq"):
        with pytest.raises(ValueError):
            blockdrv.open(path, bad)


def test_a_disk_does_not_grow(tmp_path):
    path = _vhdx(tmp_path, size=2 * MiB)
    with blockdrv.open(path, "r+b", buffering=0) as raw:
        raw.seek(2 * MiB - 4)
        assert raw.write(b"12345678") == 4          # what fits, as a block device
        with pytest.raises(OSError) as exc:
            raw.write(b"5678")
        assert exc.value.errno == errno.ENOSPC
        assert isinstance(exc.value, BlockDriverError)
        with pytest.raises(io.UnsupportedOperation) as exc:
            raw.truncate(4 * MiB)
        assert exc.value.errno == errno.EINVAL and isinstance(exc.value, OSError)
    f = blockdrv.open(path, "r+b")
    f.seek(2 * MiB - 2)
    with pytest.raises(OSError) as exc:
        f.write(b"abcd")
        f.flush()
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        f.close()                    # the unwritable tail is still buffered
    assert f.closed
    with blockdrv.open(path, "r+b") as f:
        with pytest.raises(io.UnsupportedOperation) as exc:
            f.truncate(0)
        assert exc.value.errno == errno.EINVAL
    with blockdrv.open_image(path) as img:
        assert img.size == 2 * MiB                  # unchanged
        assert img.read(2 * MiB - 4, 4) == b"12ab"  # what fitted, each time
    assert not os.path.exists(str(path) + ".lock")


def test_locks_held_while_open(tmp_path):
    path = _vhdx(tmp_path)
    with blockdrv.open(path, "r+b"):
        with pytest.raises(blockdrv.PermissionConflictError) as exc:
            blockdrv.open(path, "r+b")
        assert isinstance(exc.value, OSError)
    with blockdrv.open(path, "r+b"):                # released by close
        pass


def test_seek_data_hole(tmp_path):
    path = _vhdx(tmp_path)              # 1 MiB blocks: allocation has that grain
    with blockdrv.open(path, "r+b") as f:
        f.seek(3 * MiB + 100)
        f.write(b"x" * 5000)
        f.seek(6 * MiB)
        f.write(b"y")
    with blockdrv.open(path) as f:
        # unallocated blocks are holes; so are the parts of an allocated
        # block known to read as zeros (at the host file's granularity)
        assert f.seek(0, os.SEEK_DATA) == 3 * MiB
        assert f.seek(0, os.SEEK_HOLE) == 0
        assert f.seek(3 * MiB + 7, os.SEEK_DATA) == 3 * MiB + 7
        hole = f.seek(3 * MiB, os.SEEK_HOLE)
        assert 3 * MiB + 5100 <= hole <= 4 * MiB
        assert f.seek(hole, os.SEEK_DATA) == 6 * MiB
        hole = f.seek(6 * MiB, os.SEEK_HOLE)
        assert 6 * MiB + 1 <= hole <= 7 * MiB and f.tell() == hole
        with pytest.raises(OSError) as exc:
            f.seek(7 * MiB, os.SEEK_DATA)           # no data after it
        assert exc.value.errno == errno.ENXIO
        with pytest.raises(OSError) as exc:
            f.seek(8 * MiB, os.SEEK_HOLE)           # at the end
        assert exc.value.errno == errno.ENXIO


# -- errors are OSErrors with their errno ---------------------------------------------

def test_errors_are_oserrors(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        blockdrv.open(tmp_path / "missing.vhdx")
    assert exc.value.errno == errno.ENOENT and exc.value.filename == str(tmp_path / "missing.vhdx")
    assert isinstance(exc.value, blockdrv.InvalidArgumentError)     # the old name still works
    assert str(exc.value) == "No such file or directory"
    for mode in ("rb", "r+b"):
        with pytest.raises(IsADirectoryError) as exc:
            blockdrv.open(tmp_path, mode)
        assert exc.value.errno == errno.EISDIR
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(2 * MiB))
    with pytest.raises(OSError) as exc:
        blockdrv.open(bad, format="vhdx")
    assert isinstance(exc.value, CorruptImageError) and exc.value.errno == errno.EINVAL
    assert "\n" not in str(exc.value) and str(exc.value) == exc.value.message
    # the tree: every class an OSError, names unchanged
    for cls in (blockdrv.BlockDriverError, blockdrv.BlockIOError, blockdrv.CorruptImageError,
                blockdrv.InvalidArgumentError, blockdrv.PermissionConflictError,
                blockdrv.ReadOnlyError, blockdrv.UnsupportedError):
        assert issubclass(cls, OSError)
    e = blockdrv.BlockIOError("disk gone", errno=errno.EIO, filename="x")
    assert (str(e), e.errno, e.filename, e.strerror, e.message) == \
        ("disk gone", errno.EIO, "x", "disk gone", "disk gone")


def _open_as_nobody(path, mode) -> str:
    """What ``blockdrv.open`` raises in a forked child that dropped root
    (root ignores file modes); the class name, errno and whether it is still
    a ReadOnlyError, through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns
        out = "no error"
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            try:
                blockdrv.open(path, mode).close()
            except OSError as e:
                out = f"{type(e).__name__} {e.errno} {isinstance(e, blockdrv.ReadOnlyError)}"
        except BaseException as e:  # noqa: BLE001
            out = f"child failed: {e!r}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_permission_error():
    """A writable open of a file the user may not write: PermissionError
    (EACCES), still a ReadOnlyError.  The directory is made reachable to
    nobody (pytest's own tmp_path is private to root)."""
    import pathlib
    import tempfile
    top = tempfile.mkdtemp(prefix="blockdrv-perm-")
    try:
        os.chmod(top, 0o755)
        path = _vhdx(pathlib.Path(top))
        os.chmod(path, 0o444)
        assert _open_as_nobody(str(path), "r+b") == \
            f"HostPermissionError {errno.EACCES} True"
        assert _open_as_nobody(str(path), "rb") == "no error"
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- the standard library and a filesystem parser reading from inside a VHDX ----------

def test_tarfile_inside_vhdx(tmp_path):
    members = {"a.txt": b"hello from inside a VHDX\n", "dir/b.bin": _pattern(1_500_000, 7),
               "dir/empty": b""}
    path = _vhdx(tmp_path, size=16 * MiB)
    with blockdrv.open(path, "r+b") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with blockdrv.open(path) as f:
        with tarfile.open(fileobj=f) as tar:              # compression probed: none
            assert tar.getnames() == list(members)
            for name, data in members.items():
                assert tar.extractfile(name).read() == data
            tar.extractall(tmp_path / "out", filter="data")
    for name, data in members.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    # the archive really is the disk's first bytes, as qemu-img sees the image
    if shutil.which("qemu-img"):
        raw = tmp_path / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path),
                        str(raw)], check=True, timeout=120)
        with tarfile.open(raw) as tar:
            assert tar.extractfile("dir/b.bin").read() == members["dir/b.bin"]


def test_zipfile_inside_vhdx(tmp_path):
    """zipfile finds its central directory from the end of the file, so the
    archive goes into the disk's last 64 KiB (a zip appended to a disk): the
    zeros after it are skipped as zipfile skips a comment area, and the
    offset before it as it skips a self-extractor's stub."""
    members = {"one.txt": b"one " * 1000, "two/three.bin": _pattern(20_000, 3)}
    path = _vhdx(tmp_path, size=8 * MiB)
    start = 8 * MiB - 65536
    with blockdrv.open(path, "r+b") as f:
        f.seek(start)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        assert f.tell() < 8 * MiB
    with blockdrv.open(path) as f:
        with zipfile.ZipFile(f) as zf:
            assert zf.namelist() == list(members)
            assert zf.testzip() is None                   # every CRC checked
            for name, data in members.items():
                assert zf.read(name) == data
            assert zf.getinfo("one.txt").header_offset == 0 or zf.start_dir > 0


def _ext4_image(tmp_path):
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if mkfs is None:
        if in_ci():
            pytest.fail("CI=true but mkfs.ext4 is missing (apt-get install e2fsprogs)")
        pytest.skip("mkfs.ext4 is not installed")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_bytes(b"blockdrv-guest\n")
    (tree / "data").mkdir()
    (tree / "data" / "big.bin").write_bytes(_pattern(3 * MiB + 123, 5))
    os.symlink("etc/hostname", tree / "link")
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", "-L", "bdtest", "-d", str(tree), str(raw)],
                   check=True, timeout=120, capture_output=True)
    vhdx = tmp_path / "fs.vhdx"
    blockdrv.convert(raw, vhdx, fmt="vhdx", src_fmt="raw")
    return tree, raw, vhdx


def test_ext4_parser_inside_vhdx(tmp_path):
    try:
        from dissect.extfs import ExtFS
    except ImportError:
        if in_ci():
            pytest.fail("CI=true but dissect.extfs (the test extra) is missing")
        pytest.skip("dissect.extfs is not installed (pip install -e '.[test]')")
    tree, raw, vhdx = _ext4_image(tmp_path)
    with blockdrv.open(vhdx) as f:
        fs = ExtFS(f)
        assert fs.volume_name == "bdtest"
        assert sorted(fs.get("/").listdir()) == [".", "..", "data", "etc", "link",
                                                 "lost+found"]
        assert fs.get("/etc/hostname").open().read() == b"blockdrv-guest\n"
        big = fs.get("/data/big.bin")
        assert big.size == 3 * MiB + 123
        assert hashlib.sha256(big.open().read()).digest() == \
            hashlib.sha256((tree / "data" / "big.bin").read_bytes()).digest()
        assert fs.get("/link").link == "etc/hostname"
