"""Reading qemu-made qcow2 images: the guest data (qemu-img convert -O raw),
info and map against qemu-img 7.2, backing chains through the core, and the
refusals (encryption, external data file, writing unknown header extensions)."""

from __future__ import annotations

import json
import os

import pytest

import blockdrv
from blockdrv.cli import main
from blockdrv.testing.qemu import qemu_img_info, run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop

WRITES = ["write -P 0xab 0 100k", "write -z 1M 128k", "write -P 0x11 3M 4k",
          "write -P 0x22 3146240 1k", "write -z -u 5M 64k", "write -P 0x33 7M 256k",
          "discard 7M 64k", "write -P 0x44 15728643 17"]

VARIANTS = {
    "v3": [], "v2": ["-o", "compat=0.10"], "512": ["-o", "cluster_size=512"],
    "2M": ["-o", "cluster_size=2M"], "extl2": ["-o", "extended_l2=on"],
    "extl2-32k": ["-o", "extended_l2=on,cluster_size=32k"],
    "refcount1": ["-o", "refcount_bits=1"], "lazy": ["-o", "lazy_refcounts=on"],
    "prealloc": ["-o", "preallocation=metadata"],
}


def make(tmp_path, name, opts, size="16M", script=WRITES, backing=None):
    path = str(tmp_path / name)
    extra = ["-b", backing[0], "-F", backing[1]] if backing else []
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", *opts, *extra, path, size)
    assert rc == 0, err
    if script:
        rc, out, err = run_qemu_io(path, script, fmt="qcow2")
        assert rc == 0, (out, err)
    return path


def same_as_qemu(tmp_path, capsys, path, info=True, own_layer_only=False):
    q, b = str(tmp_path / "q.raw"), str(tmp_path / "b.raw")
    assert run_qemu_img("convert", "-O", "raw", path, q)[0] == 0
    assert main(["convert", "-O", "raw", path, b]) == 0
    with open(q, "rb") as f1, open(b, "rb") as f2:
        assert f1.read() == f2.read()
    capsys.readouterr()
    assert main(["map", "--output=json", path]) == 0
    ours = capsys.readouterr().out
    rc, theirs, _ = run_qemu_img("map", "--output=json", path)
    ours, theirs = json.loads(ours), json.loads(theirs)
    if own_layer_only:
        # the parent's own block status is its driver's business (blockdrv's
        # vhdx reports its real allocation, qemu's the whole disk as data)
        ours = [e for e in ours if e["depth"] == 0]
        theirs = [e for e in theirs if e["depth"] == 0]
    assert ours == theirs
    if info:
        assert main(["info", "--output=json", path]) == 0
        assert json.loads(capsys.readouterr().out) == qemu_img_info(path)
    os.unlink(q)
    os.unlink(b)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_map_info_as_qemu(qemu_img, qemu_io, tmp_path, capsys, variant, figures):
    before = None
    path = make(tmp_path, "img.qcow2", VARIANTS[variant])
    with open(path, "rb") as f:
        before = f.read()
    same_as_qemu(tmp_path, capsys, path)
    with open(path, "rb") as f:
        assert f.read() == before            # nothing written by any command
    figures("qcow2 read", "qemu-made images read alike", tried=1, survived=1)


def test_subclusters(qemu_img, qemu_io, tmp_path, capsys):
    # extended L2: 2 KiB subclusters of a 64 KiB cluster, mixed states
    path = make(tmp_path, "sub.qcow2", ["-o", "extended_l2=on"],
                script=["write -P 1 0 2k", "write -P 2 6k 3k", "write -z 64k 4k",
                        "write -P 3 128k 1k", "write -z 129k 1k", "discard 128k 2k"])
    same_as_qemu(tmp_path, capsys, path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", ["512", "4k", "64k", "2M"])
def test_compressed(qemu_img, qemu_io, tmp_path, capsys, cluster, ctype):
    src = str(tmp_path / "src.raw")
    assert run_qemu_img("create", "-q", "-f", "raw", src, "8M")[0] == 0
    assert run_qemu_io(src, ["write -P 0x5a 0 1M", "write -P 0x17 2097252 300k"],
                       fmt="raw")[0] == 0
    # incompressible clusters, which qemu stores uncompressed beside the others
    with open(src, "r+b") as f:
        f.seek(6 << 20)
        f.write(os.urandom(200_000))
    dst = str(tmp_path / "c.qcow2")
    rc, _, err = run_qemu_img("convert", "-c", "-O", "qcow2", "-o",
                              f"cluster_size={cluster},compression_type={ctype}", "-f", "raw",
                              src, dst)
    assert rc == 0, err
    assert qemu_img_info(dst)["format-specific"]["data"]["compression-type"] == ctype
    same_as_qemu(tmp_path, capsys, dst)
    out = tmp_path / "out.raw"
    assert main(["convert", "-O", "raw", dst, str(out)]) == 0
    rc, text, err = run_qemu_img("compare", "-f", "qcow2", "-F", "raw", dst, str(out))
    assert rc == 0, (text, err)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx"])
def test_backing_chain(qemu_img, qemu_io, tmp_path, capsys, fmt):
    base = str(tmp_path / f"base.{fmt}")
    assert run_qemu_img("create", "-q", "-f", fmt, base, "16M")[0] == 0
    assert run_qemu_io(base, ["write -P 0x61 0 16M"], fmt=fmt)[0] == 0
    top = make(tmp_path, "top.qcow2", [], backing=(f"base.{fmt}", fmt),
               script=["write -P 0x62 64k 64k", "write -P 0x63 1049088 512",
                       "write -z 2M 64k"])
    same_as_qemu(tmp_path, capsys, top, own_layer_only=fmt == "vhdx")
    with blockdrv.open_image(top) as img:
        assert img.read(1 << 20, 512) == b"\x61" * 512
        assert img.read((1 << 20) + 512, 512) == b"\x63" * 512       # COW by qemu


def test_snapshots_parsed(qemu_img, tmp_path):
    path = make(tmp_path, "snap.qcow2", [], script=["write -P 1 0 64k"])
    assert run_qemu_img("snapshot", "-c", "first", path)[0] == 0
    assert run_qemu_img("snapshot", "-c", "second", path)[0] == 0
    from blockdrv.block import open_node
    with open_node(path) as bs:
        names = [(s.id, s.name) for s in bs.opaque.snapshots]
    assert names == [("1", "first"), ("2", "second")]


def test_unknown_header_extension_write_refused_without_writing(qemu_img, tmp_path,
                                                                capsys):
    # qemu keeps extensions it does not know and writes them back; blockdrv
    # reads such an image but refuses to write it
    path = make(tmp_path, "img.qcow2", ["-o", "cluster_size=4k"], script=["write -P 1 0 4k"])
    with open(path, "r+b") as f:
        f.seek(112)                 # after the v3 header: no other extension here
        f.write(bytes.fromhex("12345678 00000008") + b"unknown!" + bytes(8))
    with open(path, "rb") as f:
        before = f.read()
    assert main(["io", "-c", "write -P 2 0 4k", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "header extension 0x12345678" in err
    with pytest.raises(blockdrv.UnsupportedError, match="header extension"):
        blockdrv.open_image(path, readonly=False)
    assert main(["io", "-r", "-c", "read -P 1 0 4k", path]) == 0
    with open(path, "rb") as f:
        assert f.read() == before


def test_encryption_and_data_file_refused(qemu_img, tmp_path, capsys):
    data = make(tmp_path, "df.qcow2", ["-o", f"data_file={tmp_path}/df.raw"], script=None)
    assert main(["info", data]) == 1
    assert "external data file" in capsys.readouterr().err
    enc = make(tmp_path, "enc.qcow2", [], script=None)
    with open(enc, "r+b") as f:
        f.seek(32)
        f.write((1).to_bytes(4, "big"))          # crypt_method = AES
    assert main(["info", enc]) == 1
    assert capsys.readouterr().err.endswith("Encrypted qcow2 images are not supported by "
                                            "blockdrv (encryption method 1)\n")


def _zstd_image(tmp_path):
    src = str(tmp_path / "z.raw")
    assert run_qemu_img("create", "-q", "-f", "raw", src, "1M")[0] == 0
    assert run_qemu_io(src, ["write -P 0x42 0 128k"], fmt="raw")[0] == 0
    dst = str(tmp_path / "z.qcow2")
    assert run_qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                        "compression_type=zstd", src, dst)[0] == 0
    return dst


def test_zstd_imported_only_for_a_zstd_cluster(qemu_img, tmp_path):
    import subprocess
    import sys
    path = _zstd_image(tmp_path)
    code = ("import sys, blockdrv\n"
            "with blockdrv.open_image(sys.argv[1]) as img:\n"
            "    img.read(512 << 10, 4096)\n"           # unallocated: no zstd
            "    assert 'zstandard' not in sys.modules\n"
            "    assert img.read(0, 4096) == b'\\x42' * 4096\n"
            "    assert 'zstandard' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_zstd_without_the_library(qemu_img, tmp_path, capsys, monkeypatch):
    path = _zstd_image(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)
    assert main(["convert", "-O", "raw", path, str(tmp_path / "out.raw")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "zstandard" in err
    assert main(["info", path]) == 0        # metadata needs no library


@pytest.mark.parametrize("expands_to", [64 << 20, 65536 + 512, 65536 - 512])
def test_zstd_frame_of_the_wrong_size(qemu_img, qemu_io, tmp_path, capsys, expands_to):
    """A cluster whose frame expands past (even to 64 MiB) or short of the
    cluster: a read error as qemu's, with about a cluster of memory."""
    import tracemalloc

    import zstandard

    from blockdrv.drivers.qcow2 import l2 as L
    from blockdrv.drivers.qcow2.header import Header
    path = _zstd_image(tmp_path)
    frame = zstandard.ZstdCompressor().compress(bytes(expands_to))
    with open(path, "r+b") as f:
        h = Header.parse(f.read(65536))
        f.seek(h.l1_table_offset)
        l2 = int.from_bytes(f.read(8), "big") & L.L1E_OFFSET_MASK
        end = f.seek(0, 2)
        f.write(frame + bytes(-len(frame) % 512))
        f.seek(l2)
        f.write(L.pack_compressed(end, len(frame), h.cluster_bits).to_bytes(8, "big"))
    rc, out, _ = run_qemu_io(path, ["read 0 64k"], fmt="qcow2", readonly=True)
    assert "read failed" in out
    tracemalloc.start()
    try:
        assert main(["convert", "-O", "raw", path, str(tmp_path / "o.raw")]) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "decompress" in err
    assert peak < 16 << 20
