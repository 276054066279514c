"""blockdrv measure -O qcow2 equals qemu-img measure -O qcow2 7.2 (human and
json) for --size and for raw, qcow2 and vhdx sources, with and without
cluster_size, refcount_bits, extended_l2, compat and preallocation."""

from __future__ import annotations

import json

import pytest

from blockdrv.cli import main
from blockdrv.testing.qemu import run_qemu_img, run_qemu_io

pytestmark = pytest.mark.interop

SCRIPT = ["write -P 1 0 1M", "write -P 2 3M 4k", "write -z 5M 1M", "write -P 3 9M 100k",
          "write -P 4 15728643 17"]

OPTIONS = [None, "cluster_size=512", "cluster_size=4k,preallocation=metadata",
           "cluster_size=2M,refcount_bits=1", "extended_l2=on,preallocation=falloc",
           "compat=0.10", "refcount_bits=64,preallocation=full", "cluster_size=32k"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    out = {}
    for fmt, opts in (("raw", ()), ("qcow2", ()), ("qcow2", ("-o", "compat=0.10")),
                      ("qcow2", ("-o", "cluster_size=4k")), ("vhdx", ())):
        path = str(d / f"src-{fmt}-{len(out)}.{fmt}")
        assert run_qemu_img("create", "-q", "-f", fmt, *opts, path, "16M")[0] == 0
        assert run_qemu_io(path, SCRIPT, fmt=fmt)[0] == 0
        out[path] = fmt
    bitmaps = str(d / "bitmaps.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", bitmaps, "64M")[0] == 0
    for args in (["--add", bitmaps, "b0"], ["--add", "-g", "512", bitmaps, "a longer name"]):
        assert run_qemu_img("bitmap", *args)[0] == 0
    out[bitmaps] = "qcow2"
    comp = str(d / "comp.qcow2")
    assert run_qemu_img("convert", "-c", "-O", "qcow2", next(iter(out)), comp)[0] == 0
    out[comp] = "qcow2"
    # a whole vhdx: qemu's vhdx has no block status (every byte is data to it)
    full = str(d / "full.vhdx")
    assert run_qemu_img("create", "-q", "-f", "vhdx", full, "8M")[0] == 0
    assert run_qemu_io(full, ["write -P 9 0 8M"], fmt="vhdx")[0] == 0
    out[full] = "vhdx"
    return out


def _both(capsys, args):
    capsys.readouterr()
    rc = main(["measure", *args])
    cap = capsys.readouterr()
    q = run_qemu_img("measure", *args)
    return (rc, cap.out), q[:2]


@pytest.mark.parametrize("opts", OPTIONS)
def test_size(capsys, opts):
    for size in ("0", "1", "1G", "100M", "2T"):
        for out in ("human", "json"):
            args = ["-O", "qcow2", f"--output={out}", "--size", size,
                    *(["-o", opts] if opts else [])]
            ours, theirs = _both(capsys, args)
            assert ours == theirs, args


@pytest.mark.parametrize("opts", OPTIONS)
def test_sources(sources, capsys, opts):
    for path, fmt in sources.items():
        for out in ("human", "json"):
            args = ["-O", "qcow2", f"--output={out}", "-f", fmt,
                    *(["-o", opts] if opts else []), path]
            ours, theirs = _both(capsys, args)
            if fmt == "vhdx" and "full" not in path:
                # blockdrv's vhdx tells its real allocation, qemu's all data:
                # less required, never more, and the same full size
                if out == "human":
                    continue
                o, t = json.loads(ours[1]), json.loads(theirs[1])
                assert o["required"] <= t["required"]
                assert o["fully-allocated"] == t["fully-allocated"]
                continue
            assert ours == theirs, args


def test_backing_option(sources, capsys):
    path = next(p for p, f in sources.items() if f == "raw")
    args = ["-O", "qcow2", "-o", "backing_file=x.qcow2,backing_fmt=qcow2", "-f", "raw", path]
    ours, theirs = _both(capsys, args)
    assert ours == theirs


@pytest.mark.parametrize("opts", ["cluster_size=3k", "compat=0.9", "refcount_bits=3",
                                  "compat=0.10,refcount_bits=8", "preallocation=xx",
                                  "extended_l2=on,cluster_size=4k"])
def test_refusals(capsys, opts):
    capsys.readouterr()
    for size in ("1G", "7E"):
        args = ["-O", "qcow2", "--size", size, "-o", opts]
        rc = main(["measure", *args])
        err = capsys.readouterr().err
        qrc, _, qerr = run_qemu_img("measure", *args)
        assert (rc, err.replace("blockdrv:", "qemu-img:")) == (qrc, qerr)
