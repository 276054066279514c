"""blockdrv info of qcow2 images equals qemu-img info 7.2, human and json:
the format-specific keys (compat, compression-type, lazy-refcounts,
refcount-bits, corrupt, extended-l2), the dirty flag, the backing file, the
snapshot list and persistent bitmaps (auto, in-use)."""

from __future__ import annotations

import pytest

from blockdrv.cli import main
from blockdrv.testing.qcow2_damage import Damage
from blockdrv.testing.qemu import run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop


def _create(path, *opts, backing=None, size="4M"):
    extra = ["-b", backing, "-F", "qcow2"] if backing else []
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", *opts, *extra, path, size)
    assert rc == 0, err
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("info")
    out = [_create(str(d / "v3.qcow2")), _create(str(d / "v2.qcow2"), "-o", "compat=0.10")]
    out.append(_create(str(d / "mixed.qcow2"), "-o", "lazy_refcounts=on,extended_l2=on,"
                       "compression_type=zstd,refcount_bits=4,cluster_size=32k"))
    out.append(_create(str(d / "child.qcow2"), backing=out[0]))
    snap = _create(str(d / "snap.qcow2"))
    for name in ("first", "a longer snapshot name"):
        assert run_qemu_io(snap, ["write -P 1 0 64k"], fmt="qcow2")[0] == 0
        assert run_qemu_img("snapshot", "-c", name, snap)[0] == 0
    out.append(snap)
    v2snap = _create(str(d / "v2snap.qcow2"), "-o", "compat=0.10")
    assert run_qemu_img("snapshot", "-c", "old", v2snap)[0] == 0
    out.append(v2snap)
    dirty = _create(str(d / "dirty.qcow2"), "-o", "lazy_refcounts=on")
    assert run_qemu_io(dirty, ["write -P 1 0 64k", "sigraise 9"], fmt="qcow2")[0] != 0
    out.append(dirty)
    bitmaps = _create(str(d / "bitmaps.qcow2"))
    for args in (["--add", bitmaps, "b0"], ["--add", "-g", "4k", "--disable", bitmaps, "b1"]):
        assert run_qemu_img("bitmap", *args)[0] == 0
    # a writer killed with a bitmap loaded leaves it "in-use"
    assert run_qemu_io(bitmaps, ["write -P 1 0 64k", "sigraise 9"], fmt="qcow2")[0] != 0
    out.append(bitmaps)
    corrupt = _create(str(d / "corrupt.qcow2"))
    Damage(corrupt).put64(72, 2)                    # the corrupt bit
    out.append(corrupt)
    return out


@pytest.mark.parametrize("output", ["human", "json"])
def test_info_like_qemu(images, capsys, output):
    for path in images:
        capsys.readouterr()
        rc = main(["info", f"--output={output}", path])
        cap = capsys.readouterr()
        assert (rc, cap.out) == run_qemu_img("info", f"--output={output}", path)[:2], path
