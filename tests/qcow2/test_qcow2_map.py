"""blockdrv map of qcow2 images equals qemu-img map 7.2, human and json:
compressed clusters (human output refuses them as qemu does), zero
clusters (plain and preallocated), ranges unallocated over a backing file,
subclusters of extended L2 entries, metadata preallocation."""

from __future__ import annotations

import pytest

from blockdrv.cli import main
from blockdrv.testing.qemu import run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop

CHILD = ["write -P 2 4k 4k", "write -z 64k 8k", "write -c -P 3 1M 64k",
         "write -P 5 2M 64k", "write -z -u 3M 64k", "write -z 5M 128k",
         "discard 2M 32k"]


def _create(path, *opts, backing=None):
    extra = ["-b", backing, "-F", "qcow2"] if backing else []
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", *opts, *extra, path, "8M")
    assert rc == 0, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("map")
    base = str(d / "base.qcow2")
    _create(base)
    assert run_qemu_io(base, ["write -P 1 0 4M", "write -z 6M 1M"], fmt="qcow2")[0] == 0
    out = {"base": base}
    for name, opts in {"plain": (), "extl2": ("-o", "extended_l2=on"),
                       "extl2-32k": ("-o", "extended_l2=on,cluster_size=32k"),
                       "v2": ("-o", "compat=0.10"), "512": ("-o", "cluster_size=512")
                       }.items():
        for over in (False, True):
            path = str(d / f"{name}{'-over' if over else ''}.qcow2")
            _create(path, *opts, backing=base if over else None)
            assert run_qemu_io(path, CHILD, fmt="qcow2")[0] == 0
            out[path] = path
    comp = str(d / "compressed.qcow2")
    assert run_qemu_img("convert", "-c", "-O", "qcow2", base, comp)[0] == 0
    pre = str(d / "prealloc.qcow2")
    _create(pre, "-o", "preallocation=metadata")
    assert run_qemu_io(pre, ["write -P 7 1M 64k", "write -z 2M 64k"], fmt="qcow2")[0] == 0
    out.update({comp: comp, pre: pre})
    # the preallocation test counts clusters in use block by block: refcounts
    # narrower than a byte, several refcount blocks, and a file whose
    # clusters are all in use but written (falloc: no metadata preallocation)
    for name, opts in {"prealloc-r1": "preallocation=metadata,refcount_bits=1",
                       "prealloc-512": "preallocation=metadata,cluster_size=512",
                       "falloc-512": "preallocation=falloc,cluster_size=512,"
                                     "refcount_bits=64"}.items():
        path = str(d / f"{name}.qcow2")
        _create(path, "-o", opts)
        assert run_qemu_io(path, ["write -P 7 1M 64k"], fmt="qcow2")[0] == 0
        out[path] = path
    return sorted(out.values())


@pytest.mark.parametrize("output", ["human", "json"])
def test_map_like_qemu(images, capsys, output):
    for path in images:
        capsys.readouterr()
        rc = main(["map", f"--output={output}", path])
        cap = capsys.readouterr()
        qrc, qout, qerr = run_qemu_img("map", f"--output={output}", path)
        assert (rc, cap.out) == (qrc, qout), path
        assert cap.err.replace("blockdrv:", "qemu-img:") == qerr, path
