"""Compressed qcow2 writes: ``convert -c`` and ``io -c 'write -c'`` against
qemu-img / qemu-io 7.2, file for file, over sources with data, all-zero
clusters, holes, uncompressible data and an unaligned end."""

from __future__ import annotations

import os
import random

import pytest

from blockdrv.cli import main
from blockdrv.testing.qemu import (qemu_img_check, run_blockdrv_io, run_qemu_img,
                                   run_qemu_io)

pytestmark = pytest.mark.interop

MiB = 1 << 20


def qemu(*args):
    rc, out, err = run_qemu_img(*map(str, args))
    assert rc == 0, err
    return out


def make_source(path, size=6 * MiB + 1536, seed=1):
    """Random (uncompressible) data, text (compressible), a run of zeros
    written as data, holes, and a partial last cluster."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(rnd.randbytes(300 * 1024))
        f.seek(512 * 1024)
        f.write(b"compressible block layer text " * 40000)
        f.seek(2 * MiB + 4096)
        f.write(bytes(200 * 1024))                  # zeros as data
        f.seek(3 * MiB + 777)
        f.write(rnd.randbytes(5000))                # a short island in a hole
        f.seek(size - 1000)
        f.write(b"tail" * 250)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("csrc")
    raw = make_source(d / "src.raw")
    qemu("convert", "-O", "vhdx", raw, d / "src.vhdx")
    qemu("convert", "-O", "qcow2", "-o", "cluster_size=4k", raw, d / "src.qcow2")
    qemu("convert", "-c", "-O", "qcow2", raw, d / "srcc.qcow2")
    return d


def convert_both(tmp_path, src, opts):
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    qemu("convert", "-c", "-O", "qcow2", "-o", opts, src, ref)
    assert main(["convert", "-c", "-O", "qcow2", "-o", opts, str(src), str(ours)]) == 0
    return ref, ours


def assert_identical(ref, ours, src):
    a, b = ref.read_bytes(), ours.read_bytes()
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pytest.fail(f"files differ at byte {at:#x} (sizes {len(a)} / {len(b)})")
    rc, report = qemu_img_check(ours, "qcow2")
    assert rc == 0, report
    assert report["check-errors"] == 0 and not report.get("leaks")
    assert report["compressed-clusters"] > 0
    qemu("compare", src, ours)


FAST = [("src.raw", "compression_type=zlib,cluster_size=64k"),
        ("src.raw", "compression_type=zstd,cluster_size=4k"),
        ("src.qcow2", "compression_type=zlib,cluster_size=2M")]
SLOW = [(s, f"compression_type={ct},cluster_size={cs}")
        for s in ("src.raw", "src.vhdx", "src.qcow2", "srcc.qcow2")
        for ct in ("zlib", "zstd") for cs in ("4k", "16k", "64k", "512k", "2M")]


@pytest.mark.parametrize("src,opts", FAST)
def test_convert_c_identical(tmp_path, sources, src, opts):
    ref, ours = convert_both(tmp_path, sources / src, opts)
    assert_identical(ref, ours, sources / src)


@pytest.mark.slow
@pytest.mark.parametrize("src,opts", [c for c in SLOW if c not in FAST])
def test_convert_c_identical_matrix(tmp_path, sources, src, opts):
    ref, ours = convert_both(tmp_path, sources / src, opts)
    assert_identical(ref, ours, sources / src)


def test_convert_c_packs_clusters(tmp_path, sources):
    """Small compressed clusters share host clusters (refcount > 1)."""
    src = tmp_path / "text.raw"
    src.write_bytes(b"0123456789abcdef" * (MiB // 16))
    ref, ours = convert_both(tmp_path, src, "cluster_size=4k")
    assert ref.read_bytes() == ours.read_bytes()
    assert os.path.getsize(ours) % 512 == 0
    assert os.path.getsize(ours) < MiB // 8


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_convert_c_refused(capsys, tmp_path, sources, fmt):
    ref_rc, _, ref_err = run_qemu_img("convert", "-c", "-O", fmt,
                                      str(sources / "src.raw"), str(tmp_path / "ref"))
    rc = main(["convert", "-c", "-O", fmt, str(sources / "src.raw"), str(tmp_path / "ours")])
    err = capsys.readouterr().err
    assert ref_rc != 0 and rc != 0
    assert err.split(": ", 1)[1] == ref_err.split(": ", 1)[1]
    assert not (tmp_path / "ours").exists() and not (tmp_path / "ref").exists()


def test_convert_c_preallocation_refused(capsys, tmp_path, sources):
    args = ["convert", "-c", "-O", "qcow2", "-o", "preallocation=metadata",
            str(sources / "src.raw")]
    ref_rc, _, ref_err = run_qemu_img(*args, str(tmp_path / "ref"))
    rc = main(args + [str(tmp_path / "ours")])
    err = capsys.readouterr().err
    assert ref_rc != 0 and rc != 0
    assert err.split(": ", 1)[1] == ref_err.split(": ", 1)[1]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_io_write_c_identical(tmp_path, ctype):
    """One cluster per request: qemu compresses the clusters of a longer
    request concurrently, so their order in the file is not fixed."""
    script = ["write -c 0 64k", "write -c -P 7 128k 64k", "write -c -P 9 192k 64k",
              "write -c -s {src} 256k 64k", "write -c 8M 64k", "write 512k 64k",
              "write -c 512k 64k", "read -P 7 128k 64k"]
    src = tmp_path / "rand"
    src.write_bytes(random.Random(3).randbytes(64 * 1024))
    script = [c.format(src=src) for c in script]
    out = {}
    for tool, run in (("qemu", run_qemu_io), ("ours", run_blockdrv_io)):
        img = tmp_path / f"{tool}.qcow2"
        qemu("create", "-q", "-f", "qcow2", "-o", f"compression_type={ctype}", img, "8M")
        rc, stdout, stderr = run(img, script, "qcow2")
        out[tool] = (rc, [line for line in stdout.splitlines() if "ops;" not in line],
                     img.read_bytes())
    assert out["ours"][0] == out["qemu"][0]
    assert out["ours"][1] == out["qemu"][1]
    assert out["ours"][2] == out["qemu"][2]
    rc, report = qemu_img_check(tmp_path / "ours.qcow2", "qcow2")
    assert rc == 0 and report["check-errors"] == 0
