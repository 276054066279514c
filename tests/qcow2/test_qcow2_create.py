"""create -f qcow2 against qemu-img 7.2: the same files byte for byte, the
same Formatting line, the same -o help and the same refusals."""

from __future__ import annotations

import json

import pytest

from blockdrv.cli import main
from blockdrv.options import parse_size
from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import run_qemu_img

pytestmark = pytest.mark.interop

# falloc/full: the refcount table moved past the metadata, one data area
# preallocated by the file protocol (also checked for its allocated extents)
PREALLOC = [
    ("0", "preallocation=falloc"), ("0", "preallocation=full"),
    ("1000", "preallocation=full"), ("20M", "preallocation=falloc"),
    ("20M", "preallocation=full"), ("256M", "preallocation=falloc"),
    ("1000000", "preallocation=falloc,extended_l2=on"),
    ("30M", "preallocation=falloc,cluster_size=512,refcount_bits=1"),
    ("20M", "preallocation=full,cluster_size=512,refcount_bits=64"),
    ("64M", "preallocation=full,cluster_size=2M,lazy_refcounts=on"),
    ("10M", "preallocation=falloc,compat=0.10,cluster_size=4k"),
    pytest.param("2G", "preallocation=full", marks=pytest.mark.slow),
]

# (size, options): every option qemu's qcow2 create takes that blockdrv
# implements, alone and combined, including refcount table growth (small
# clusters with wide refcounts) and metadata preallocation across L2 tables
MATRIX = [
    ("0", ""), ("1000", ""), ("1M", ""), ("1G", ""), ("2T", ""),
    ("100M", "compat=0.10"), ("100M", "compat=v2,cluster_size=512"),
    ("1G", "compat=1.1,lazy_refcounts=on"),
    *[("64M", f"cluster_size={c}") for c in ("512", "1k", "2k", "4k", "8k", "16k",
                                             "32k", "128k", "256k", "512k", "1M", "2M")],
    *[("1G", f"refcount_bits={b}") for b in (1, 2, 4, 8, 16, 32, 64)],
    pytest.param("64G", "cluster_size=512,refcount_bits=64", marks=pytest.mark.slow),
    ("64G", "cluster_size=512,refcount_bits=1"),
    ("8G", "cluster_size=1k,refcount_bits=32"),
    ("1G", "extended_l2=on"), ("1G", "extended_l2=on,cluster_size=16k"),
    ("1T", "compression_type=zstd,refcount_bits=8"),
    ("10M", "preallocation=metadata"), ("10M", "preallocation=off"),
    pytest.param("300M", "cluster_size=512,refcount_bits=64,preallocation=metadata",
                 marks=pytest.mark.slow),
    ("20M", "cluster_size=512,refcount_bits=64,preallocation=metadata"),
    ("2G", "cluster_size=512,refcount_bits=64"),
    ("30M", "cluster_size=512,refcount_bits=1,preallocation=metadata"),
    ("1G", "extended_l2=on,preallocation=metadata"),
    ("5G", "cluster_size=2M,preallocation=metadata,lazy_refcounts=on"),
    ("100M", "compat=0.10,preallocation=metadata,cluster_size=4k"),
    # the file ends with the last (sub)cluster of a size inside one
    ("65000", "preallocation=metadata"), ("1000000", "preallocation=metadata,extended_l2=on"),
    *PREALLOC,
]

BACKED = [("", "qcow2"), ("compat=0.10", "raw"), ("cluster_size=4k", "qcow2"),
          ("extended_l2=on,preallocation=metadata", "raw"), ("cluster_size=512", "raw")]


def both(tmp_path, capsys, args, name="img.qcow2"):
    """Run ``create args`` with both tools in two directories; (rc, out, err) each."""
    res = {}
    for tool in ("qemu", "blockdrv"):
        d = tmp_path / tool
        d.mkdir(exist_ok=True)
        full = [a.replace("@", str(d)) for a in args]
        if tool == "qemu":
            rc, out, err = run_qemu_img("create", *full)
            err = err.replace("qemu-img: ", "")
        else:
            rc = main(["create", *full])
            got = capsys.readouterr()
            out, err = got.out, got.err.replace("blockdrv: ", "")
        res[tool] = (rc, out.replace(str(d), "@"), err.replace(str(d), "@"))
    return res["qemu"], res["blockdrv"]


def same_file(tmp_path, name="img.qcow2"):
    q, b = tmp_path / "qemu" / name, tmp_path / "blockdrv" / name
    assert q.stat().st_size == b.stat().st_size
    assert compare_files(str(q), str(b), "raw") is None     # sparse-aware, no masking


@pytest.mark.parametrize("size,opts", MATRIX)
def test_create_byte_identical(qemu_img, tmp_path, capsys, size, opts, figures):
    args = ["-f", "qcow2", *(["-o", opts] if opts else []), "@/img.qcow2", size]
    q, b = both(tmp_path, capsys, args)
    assert b == q
    assert q[0] == 0
    same_file(tmp_path)
    figures("qcow2 create", "byte-identical option sets", tried=1, survived=1)


@pytest.mark.parametrize("size,opts", PREALLOC)
def test_preallocated_extents_as_qemu(qemu_img, tmp_path, capsys, size, opts):
    """Not just the bytes: the host file is allocated where qemu's is."""
    args = ["-f", "qcow2", "-q", "-o", opts, "@/img.qcow2", size]
    q, b = both(tmp_path, capsys, args)
    assert b == q and q[0] == 0
    maps, blocks = [], []
    for tool in ("qemu", "blockdrv"):
        path = tmp_path / tool / "img.qcow2"
        rc, out, err = run_qemu_img("map", "-f", "raw", "--output=json", str(path))
        assert rc == 0, err
        maps.append(out)
        blocks.append(path.stat().st_blocks)
    assert maps[1] == maps[0]
    # st_blocks also counts the file system's extent tree blocks, a few more
    # when a file lands in more pieces (seen: 4 KiB either way under load)
    assert abs(blocks[1] - blocks[0]) <= 128
    # the guest's clusters take disk space (falloc: unwritten extents, which
    # map reports as zero; full: written data)
    assert blocks[0] * 512 >= parse_size(size)
    if "full" in opts:
        assert sum(e["length"] for e in json.loads(maps[0]) if e["data"]) >= parse_size(size)


@pytest.mark.parametrize("opts,fmt", BACKED)
def test_create_with_backing_byte_identical(qemu_img, tmp_path, capsys, opts, fmt):
    for tool in ("qemu", "blockdrv"):
        (tmp_path / tool).mkdir()
        run_qemu_img("create", "-q", "-f", fmt, str(tmp_path / tool / f"base.{fmt}"), "96M")
    args = ["-f", "qcow2", *(["-o", opts] if opts else []), "-b", f"base.{fmt}", "-F", fmt,
            "@/img.qcow2"]
    q, b = both(tmp_path, capsys, args)
    assert b == q and q[0] == 0
    same_file(tmp_path)


@pytest.mark.parametrize("opts", [
    "cluster_size=1000", "cluster_size=4M", "cluster_size=256",
    "compat=0.10,extended_l2=on", "extended_l2=on,cluster_size=8k",
    "refcount_bits=3", "refcount_bits=128", "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on", "compat=0.9", "backing_fmt=raw",
    "preallocation=bogus", "compression_type=lz4", "compat=0.10,compression_type=zstd",
])
def test_create_refusals_as_qemu(qemu_img, tmp_path, capsys, opts):
    q, b = both(tmp_path, capsys, ["-f", "qcow2", "-o", opts, "@/img.qcow2", "1M"])
    assert (b[0] != 0, b[2]) == (q[0] != 0, q[2]) and q[0] != 0
    assert not (tmp_path / "blockdrv" / "img.qcow2").exists()


def test_too_large_for_the_l1_table(qemu_img, tmp_path, capsys):
    q, b = both(tmp_path, capsys, ["-f", "qcow2", "-o", "cluster_size=4k", "@/img.qcow2",
                                   "16T"])
    assert b[2] == q[2] and q[0] != 0 and b[0] != 0


@pytest.mark.parametrize("with_file", [False, True])
def test_help_as_qemu(qemu_img, tmp_path, capsys, with_file):
    args = ["-f", "qcow2", "-o", "help"] + (["@/img.qcow2"] if with_file else [])
    q, b = both(tmp_path, capsys, args)
    if with_file:
        # qemu adds the file protocol's options (extent_size_hint, nocow)
        proto = ("  extent_size_hint=<size> - Extent size hint for the image file, 0 to "
                 "disable\n", "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid "
                 "only on btrfs)\n")
        q = (q[0], "".join(line for line in q[1].splitlines(True) if line not in proto), q[2])
    assert b == q
