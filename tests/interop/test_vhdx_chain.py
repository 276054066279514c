"""commit, rebase, measure and info --backing-chain against the oracles.

qemu 7.2 cannot open VHDX differencing images, but it reads, checks and
compares every *parent* commit writes into (dynamic VHDX bases, made by
qemu-img or by blockdrv); libvhdi (pyvhdi, vhdiinfo) reads every child
rebase re-parents, with the new parent (``set_parent`` checks the linkage).

Commit into a raw base is exercised only with qcow2 children (VHDX children
need VHDX parents); the qcow2 driver cannot empty an image yet (no
``bdrv_make_empty``), so those commits keep the child (``-d``).
The images written by libvhdi-compared children always carry a sector
bitmap block (see test_vhdx_differencing.py for libvhdi's bitmap-less chunk
bug); emptied children (commit) are read by blockdrv only.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

import blockdrv
from blockdrv.testing.qemu import qemu_img_check, qemu_img_create, run_qemu_io
from blockdrv.testing.scripts import run_blockdrv
from blockdrv.testing.vhdx.scripts import vhdiinfo_fields
from blockdrv.testing.vhdx.fixtures import libvhdi_read

pytestmark = pytest.mark.interop

MiB = 1 << 20


def view(path) -> bytes:
    with blockdrv.open_image(path) as img:
        return img.read(0, img.size)


def scribble(path, seed: int, count: int = 12) -> None:
    rng = random.Random(seed)
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(512, rng.randbytes(1536))           # a sector bitmap block (libvhdi)
        for _ in range(count):
            n = rng.choice([512, 4096, 64 * 1024, MiB, 3 * MiB])
            off = rng.randrange(0, (img.size - n) // 512) * 512
            img.write(off, rng.randbytes(n))


def qemu_base(path, size="24M", seed=1) -> None:
    qemu_img_create(path, "vhdx", size, block_size="2M")
    rng = random.Random(seed)
    cmds = [f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 20) * MiB} {MiB}"
            for _ in range(6)]
    rc, out, err = run_qemu_io(path, cmds, "vhdx")
    assert rc == 0, out + err


def child_of(path, parent, **kw) -> None:
    blockdrv.create_image(path, "vhdx", backing_file=os.path.basename(parent), **kw).close()


def qemu_compare(a, b, fa="vhdx", fb="raw") -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b)],
                          capture_output=True, text=True, timeout=120)


def assert_qemu_reads(base, expected_raw) -> None:
    rc, report = qemu_img_check(base, "vhdx")
    assert rc == 0, report
    res = qemu_compare(base, expected_raw)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ commit

@pytest.mark.parametrize("base_by", ["qemu", "blockdrv"])
@pytest.mark.parametrize("drop", [False, True])
def test_commit_into_parent(tmp_path, qemu_img, qemu_io, base_by, drop):
    base, top, want = tmp_path / "base.vhdx", tmp_path / "top.vhdx", tmp_path / "want.raw"
    if base_by == "qemu":
        qemu_base(base)
    else:
        blockdrv.create_image(base, "vhdx", "24M", block_size="2M").close()
        scribble(base, 3)
    child_of(top, base)
    scribble(top, 4)
    blockdrv.convert(top, want, fmt="raw")
    before = view(top)
    rc, out, err = run_blockdrv("commit", *(["-d"] if drop else []), top)
    assert rc == 0, err
    assert out == "Image committed.\n"
    assert_qemu_reads(base, want)                 # qemu reads, checks, compares the parent
    assert view(top) == before                    # the child reads the same...
    info = json.loads(run_blockdrv("info", "--output=json", top)[1])
    blocks = info["format-specific"]["data"]["blocks"]
    if drop:
        assert "partially-present" in blocks or "fully-present" in blocks
    else:
        assert set(blocks) == {"not-present"}     # ...emptied
        assert os.path.getsize(top) <= 8 * MiB
    assert run_blockdrv("check", top)[0] == 0


def test_commit_into_deeper_base_keeps_top(tmp_path, qemu_img, qemu_io):
    base, mid, top = (tmp_path / n for n in ("base.vhdx", "mid.vhdx", "top.vhdx"))
    want = tmp_path / "want.raw"
    qemu_base(base)
    child_of(mid, base)
    scribble(mid, 5)
    child_of(top, mid)
    scribble(top, 6)
    blockdrv.convert(top, want, fmt="raw")
    mid_digest = view(mid)
    rc, out, err = run_blockdrv("commit", "-b", base, top)
    assert rc == 0, err
    assert_qemu_reads(base, want)
    assert view(top) == view(want)                # -b implies -d: top still reads the same
    assert run_blockdrv("check", mid)[0] == 0
    assert mid_digest != view(mid) or True        # mid may read differently (qemu-img(1))


def test_commit_grows_a_smaller_base(tmp_path, qemu_img, qemu_io):
    base, top, want = tmp_path / "base.vhdx", tmp_path / "top.vhdx", tmp_path / "want.raw"
    qemu_base(base, "24M")
    child_of(top, base, size="40M")
    with blockdrv.open_image(top, readonly=False) as img:
        img.write(30 * MiB, b"\x77" * (5 * MiB))
    blockdrv.convert(top, want, fmt="raw")
    assert run_blockdrv("commit", "-q", top)[0] == 0
    assert_qemu_reads(base, want)
    assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(base)],
                                     capture_output=True, text=True).stdout)[
        "virtual-size"] == 40 * MiB


def test_commit_takes_the_write_lock_on_base(tmp_path, qemu_img):
    base, top = tmp_path / "base.vhdx", tmp_path / "top.vhdx"
    qemu_base(base)
    child_of(top, base)
    scribble(top, 7)
    holder = subprocess.Popen(["qemu-io", "-f", "vhdx", str(base)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time
        time.sleep(0.5)
        rc, out, err = run_blockdrv("commit", top)
        assert rc == 1 and "lock" in err and err.count("\n") == 1, err
    finally:
        holder.communicate("quit\n", timeout=30)
    assert qemu_img_check(base, "vhdx")[0] == 0


# ------------------------------------------------------------------ rebase

def test_rebase_safe_onto_another_parent(tmp_path, qemu_img, qemu_io, pyvhdi, vhdiinfo):
    old, new, top = tmp_path / "old.vhdx", tmp_path / "new.vhdx", tmp_path / "top.vhdx"
    qemu_base(old, seed=1)
    qemu_base(new, seed=2)
    child_of(top, old)
    scribble(top, 8)
    before = view(top)
    new_digest = open(new, "rb").read()
    rc, out, err = run_blockdrv("rebase", "-b", "new.vhdx", "-F", "vhdx", top)
    assert rc == 0 and out == "", err
    assert view(top) == before
    assert libvhdi_read(pyvhdi, [new, top]) == before
    fields = vhdiinfo_fields(top, vhdiinfo)
    guid = json.loads(run_blockdrv("info", "--output=json", new)[1])[
        "format-specific"]["data"]["data-write-guid"]
    assert fields["Parent identifier"] == guid
    assert open(new, "rb").read() == new_digest   # the new parent is only read
    assert qemu_img_check(new, "vhdx")[0] == 0


def test_rebase_unsafe_repairs_a_moved_parent(tmp_path, qemu_img, qemu_io, pyvhdi):
    base, top = tmp_path / "base.vhdx", tmp_path / "top.vhdx"
    qemu_base(base)
    child_of(top, base)
    scribble(top, 9)
    before = view(top)
    (tmp_path / "store").mkdir()
    moved = tmp_path / "store" / "renamed.vhdx"
    os.rename(base, moved)
    rc, _, err = run_blockdrv("info", "--backing-chain", top)
    assert rc == 1 and err.count("base.vhdx") == 1, err      # each path tried once
    rc, _, err = run_blockdrv("rebase", "-u", "-b", "store/renamed.vhdx", top)
    assert rc == 0, err
    assert view(top) == before
    assert libvhdi_read(pyvhdi, [moved, top]) == before


def test_rebase_unsafe_refuses_a_stranger(tmp_path, qemu_img, qemu_io):
    base, other, top = tmp_path / "base.vhdx", tmp_path / "other.vhdx", tmp_path / "top.vhdx"
    qemu_base(base)
    qemu_base(other, seed=5)
    child_of(top, base)
    scribble(top, 10)
    digest = open(top, "rb").read()
    rc, _, err = run_blockdrv("rebase", "-u", "-b", "other.vhdx", top)
    assert rc == 1 and "does not match" in err and err.count("\n") == 1, err
    assert open(top, "rb").read() == digest                   # nothing written
    rc, _, err = run_blockdrv("rebase", "-u", "--ignore-id-mismatch", "-b", "other.vhdx", top)
    assert rc == 0, err
    with blockdrv.open_image(top) as img:                     # now linked to other
        assert img.bs.backing.filename.endswith("other.vhdx")


def test_rebase_flatten_refused_for_vhdx(tmp_path, qemu_img, qemu_io):
    base, top = tmp_path / "base.vhdx", tmp_path / "top.vhdx"
    qemu_base(base)
    child_of(top, base)
    digest = open(top, "rb").read()
    rc, _, err = run_blockdrv("rebase", "-b", "", top)
    assert rc == 1 and "cannot lose its parent" in err and err.count("\n") == 1
    assert open(top, "rb").read() == digest


# --------------------------------------------------------------- win32 path

def test_locator_paths_as_hyperv_writes_them(tmp_path, vhdiinfo):
    base, top = tmp_path / "base.vhdx", tmp_path / "top.vhdx"
    blockdrv.create_image(base, "vhdx", "8M").close()
    child_of(top, base)
    loc = json.loads(run_blockdrv("info", "--output=json", top)[1])[
        "format-specific"]["data"]["parent-locator"]
    assert loc["relative_path"] == "base.vhdx"
    assert "absolute_win32_path" not in loc          # /tmp/... has no Win32 name
    out = subprocess.run([vhdiinfo, str(top)], capture_output=True, text=True).stdout
    assert "\\\\?\\\\" not in out


# ------------------------------------------------------------------ measure

@pytest.mark.parametrize("opts", ["", "subformat=fixed", "subformat=fixed,block_state_zero=off",
                                  "block_size=1M"])
def test_measure_bounds_convert(tmp_path, qemu_img, qemu_io, opts):
    src, top = tmp_path / "src.vhdx", tmp_path / "top.vhdx"
    qemu_base(src, "40M")
    child_of(top, src)
    scribble(top, 11)
    o = ["-o", opts] if opts else []
    rc, out, err = run_blockdrv("measure", "--output=json", "-O", "vhdx", *o, top)
    assert rc == 0, err
    m = json.loads(out)
    dst = tmp_path / "dst.vhdx"
    blockdrv.convert(top, dst, fmt="vhdx", options=dict(
        kv.split("=") for kv in opts.split(",")) if opts else None)
    assert os.path.getsize(dst) <= m["required"] <= m["fully-allocated"]
    assert qemu_img_check(dst, "vhdx")[0] == 0
    # every block written: the fully allocated size holds it
    full = tmp_path / "full.vhdx"
    blockdrv.create_image(full, "vhdx", "40M", **(dict(
        kv.split("=") for kv in opts.split(",")) if opts else {})).close()
    with blockdrv.open_image(full, readonly=False) as img:
        img.write(0, b"\x01" * img.size)
    assert os.path.getsize(full) <= m["fully-allocated"]


def test_measure_raw_and_size(tmp_path, qemu_img):
    src = tmp_path / "src.raw"
    qemu_img_create(src, "raw", "10M")
    rc, out, _ = run_blockdrv("measure", "-O", "raw", src)
    assert out == "required size: 10485760\nfully allocated size: 10485760\n"
    q = subprocess.run(["qemu-img", "measure", "-O", "raw", str(src)],
                       capture_output=True, text=True).stdout
    assert q == out                                   # qemu measures raw alike
    rc, out, _ = run_blockdrv("measure", "--output=json", "-O", "vhdx", "--size", "1G")
    m = json.loads(out)
    empty = tmp_path / "e.vhdx"
    qemu_img_create(empty, "vhdx", "1G")
    assert os.path.getsize(empty) <= m["required"]
    rc, _, err = run_blockdrv("measure", "-O", "vhdx", "--size", "1G", src)
    assert rc == 1 and "cannot be used together" in err


# ------------------------------------------------------------- info chain

def test_info_backing_chain(tmp_path, qemu_img):
    base, mid, top = (tmp_path / n for n in ("base.vhdx", "mid.vhdx", "top.vhdx"))
    qemu_base(base)
    child_of(mid, base)
    child_of(top, mid)
    rc, out, err = run_blockdrv("info", "--backing-chain", "--output=json", top)
    infos = json.loads(out)
    assert [os.path.basename(i["filename"]) for i in infos] == \
        ["top.vhdx", "mid.vhdx", "base.vhdx"]
    assert "backing-filename" not in infos[-1]
    rc, out, err = run_blockdrv("info", "--backing-chain", top)
    assert out.count("\n\nimage: ") == 2
    q = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(base)],
                                  capture_output=True, text=True).stdout)
    assert q["virtual-size"] == infos[-1]["virtual-size"]


# ----------------------------------------------- generic: qcow2 over raw/vhdx

@pytest.mark.parametrize("base_fmt", ["raw", "vhdx"])
def test_commit_generic_qcow2_child(tmp_path, qemu_img, qemu_io, base_fmt):
    """The engine is the core's: a qcow2 child made by qemu-img (which
    blockdrv cannot empty yet, so -d) commits into a raw or VHDX base; qemu-img then reads the
    base and the whole chain."""
    base, top, want = tmp_path / f"base.{base_fmt}", tmp_path / "top.qcow2", tmp_path / "w.raw"
    qemu_img_create(base, base_fmt, "16M")
    rc, out, err = run_qemu_io(base, ["write -P 0x21 0 3M", "write -P 0x22 9M 1M"], base_fmt)
    assert rc == 0, out + err
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", base_fmt,
                    str(top)], check=True, cwd=tmp_path)
    rc, out, err = run_qemu_io(top, ["write -P 0x33 2M 2M", "write -P 0x34 12M 64k",
                                     "write -z 9M 4k"], "qcow2")
    assert rc == 0, out + err
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(want)], check=True)
    rc, _, err = run_blockdrv("commit", top)       # qcow2 cannot be emptied here
    assert rc == 1 and "-d" in err and err.count("\n") == 1
    rc, out, err = run_blockdrv("commit", "-d", top)
    assert rc == 0, err
    res = qemu_compare(base, want, base_fmt)
    assert res.returncode == 0, res.stdout + res.stderr
    res = qemu_compare(top, want, "qcow2")
    assert res.returncode == 0, res.stdout + res.stderr
    if base_fmt == "vhdx":
        assert qemu_img_check(base, "vhdx")[0] == 0
    assert qemu_img_check(top, "qcow2")[0] == 0
