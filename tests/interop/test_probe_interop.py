"""Probing against qemu-img/qemu-io 7.2: every format qemu-img creates here
(and hand-made bochs, cloop, dmg, luks images qemu opens) is named by qemu-img
info and refused by blockdrv, never reported as raw, never modified; a
probed raw image's block 0 is guarded as qemu-io guards it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from blockdrv.cli import main
from blockdrv.testing import foreign
from blockdrv.testing.qemu import qemu_img_info, replay_script, run_blockdrv_io, run_qemu_img

pytestmark = pytest.mark.interop

CREATED = ["vmdk", "vdi", "qed", "qcow", "parallels", "vpc"]   # qcow2: a driver now
# luks: qemu-img's create benchmarks PBKDF2 against a thread CPU clock that is
# too coarse on some machines ("Unable to get accurate CPU usage", at random),
# so its header is built by hand -- qemu-img still has to name it below.
HANDMADE = {"bochs": foreign.bochs, "cloop": foreign.cloop, "dmg": foreign.dmg,
            "luks": foreign.luks}


@pytest.fixture(scope="module")
def images(qemu_img, tmp_path_factory):
    """One image per format, made once for the module (qemu-img create is the
    slow part)."""
    d = tmp_path_factory.mktemp("foreign")
    made = {}
    for fmt in CREATED:
        path = str(d / f"x.{fmt}")
        rc, _, err = run_qemu_img("create", "-q", "-f", fmt, path, "1M")
        assert rc == 0, err
        made[fmt] = path
    for fmt, build in HANDMADE.items():
        made[fmt] = str(d / f"x.{fmt}")
        with open(made[fmt], "wb") as f:
            f.write(build())
    return made


def snapshot(path: str):
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mtime_ns


def refusal(path: str, fmt: str) -> str:
    return (f"blockdrv: Could not open '{path}': Image is in {fmt} format, "
            "which blockdrv does not support\n")


@pytest.mark.parametrize("fmt", CREATED + sorted(HANDMADE))
def test_qemu_names_it_and_blockdrv_refuses(images, capsys, tmp_path, fmt):
    path = images[fmt]
    before = snapshot(path)
    # qemu-img probes the same format (so the table and qemu agree)...
    rc, out, err = run_qemu_img("info", "--output=json", path)
    assert rc == 0, err
    assert json.loads(out)["format"] == fmt
    # ... and every blockdrv command refuses it, naming the format
    out_raw = str(tmp_path / "out.raw")
    for argv in (["info", path], ["info", "--output=json", path], ["map", path],
                 ["check", path], ["convert", "-O", "raw", path, out_raw],
                 ["compare", path, path], ["resize", path, "2M"],
                 ["bench", "-c", "1", "-w", path]):
        code = main(argv)
        got = capsys.readouterr()
        want = 2 if argv[0] == "compare" else 1       # qemu-img compare's error code
        assert (code, got.out, got.err) == (want, "", refusal(path, fmt)), argv
    rc, out, err = run_blockdrv_io(path, ["write -P 0xff 0 512"])
    assert (rc, out) == (1, "")
    assert err == (f"blockdrv: can't open device {path}: Image is in {fmt} format, "
                   "which blockdrv does not support\n")
    assert snapshot(path) == before
    assert not os.path.exists(out_raw)
    # the user's explicit -f raw still opens it, as qemu-img does
    assert main(["info", "--output=json", "-f", "raw", path]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours == qemu_img_info(path, "raw")
    assert snapshot(path) == before


def test_qcow2_now_opens_as_qemu_names_it(qemu_img, tmp_path, capsys):
    """The built-in qcow2 driver took the format over from the refusal table."""
    path = str(tmp_path / "x.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", path, "1M")[0] == 0
    assert main(["info", "--output=json", path]) == 0
    assert json.loads(capsys.readouterr().out) == qemu_img_info(path)


def test_footer_only_vhd_and_flat_vmdk_descriptor(qemu_img, tmp_path, capsys):
    """qemu 7.2 probes a fixed VHD (footer at the end only) as raw; a
    monolithicFlat descriptor is vmdk.  blockdrv agrees on both."""
    vhd, vmdk = str(tmp_path / "fixed.vpc"), str(tmp_path / "flat.vmdk")
    run_qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", vhd, "1M")
    run_qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", vmdk, "1M")
    assert qemu_img_info(vhd)["format"] == "raw"
    assert main(["info", "--output=json", vhd]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "raw"
    assert qemu_img_info(vmdk)["format"] == "vmdk"
    assert main(["info", vmdk]) == 1
    assert capsys.readouterr().err == refusal(vmdk, "vmdk")


def test_dmg_without_trailer_refused_as_qemu_words_it(qemu_img, tmp_path, capsys):
    path = str(tmp_path / "nokoly.dmg")
    with open(path, "wb") as f:
        f.write(foreign.dmg(koly=False))
    rc, _, qerr = run_qemu_img("info", path)
    assert rc == 1
    line = f"Could not open '{path}': Could not locate UDIF trailer in dmg file"
    assert f"qemu-img: {line}\n" in qerr      # after qemu's module-loading noise
    assert main(["info", path]) == 1
    assert capsys.readouterr().err == f"blockdrv: {line}\n"


def test_create_backing_foreign_without_F(images, tmp_path, capsys):
    child = str(tmp_path / "child.vhdx")
    assert main(["create", "-f", "vhdx", "-b", images["qcow"], child]) == 1
    assert capsys.readouterr().err == (
        f"blockdrv: {child}: Could not open backing file '{images['qcow']}': "
        "Image is in qcow format, which blockdrv does not support\n")
    assert not os.path.exists(child)


# -- block 0 of a probed raw image, against qemu-io ----------------------------------


def both_io(tmp_path, monkeypatch, script, fmt=None, template=None):
    """Run ``script`` with qemu-io and with blockdrv io on two copies of one
    raw file (same relative name, so the warnings compare); their results."""
    results = {}
    for tool in ("qemu", "blockdrv"):
        d = tmp_path / tool
        d.mkdir()
        if template:
            shutil.copyfile(template, d / "disk.raw")
        else:
            with open(d / "disk.raw", "wb") as f:
                f.truncate(1 << 20)
        monkeypatch.chdir(d)
        res = replay_script(script, "disk.raw", fmt, tool)
        results[tool] = (res, snapshot(d / "disk.raw")[0])
    (q, qdata), (b, bdata) = results["qemu"], results["blockdrv"]
    assert b.normalized == q.normalized
    assert bdata == qdata
    return q, qdata


def test_block0_write_refused_as_qemu_io(images, tmp_path, monkeypatch, qemu_io):
    sig = tmp_path / "sig.bin"
    with open(images["qcow"], "rb") as f:
        sig.write_bytes(f.read(512))
    q, data = both_io(tmp_path, monkeypatch, [f"write -s {sig} 0 512"])
    assert q.rc == 1 and q.stdout == "write failed: Operation not permitted\n"
    assert "probing guessed raw" in q.stderr
    assert data == bytes(1 << 20)


def test_block0_merged_sector_checked_as_qemu_io(tmp_path, monkeypatch, qemu_io):
    kdm = tmp_path / "kdm.bin"
    kdm.write_bytes(b"KDM")
    q, data = both_io(tmp_path, monkeypatch, ["write -P 0x56 3 1", f"write -s {kdm} 0 3",
                                              "write -P 0x51 0 1", "write -z 0 3",
                                              "discard 0 512", "write -P 0x20 0 512"])
    # "KDM" + "V" would be a vmdk magic: refused; the others are allowed
    assert q.stdout.count("write failed: Operation not permitted") == 1
    assert data[:512] == b" " * 512


def test_block0_explicit_raw_allows_signatures(tmp_path, monkeypatch, qemu_io):
    sig = tmp_path / "vhdx.bin"
    sig.write_bytes(b"vhdxfile".ljust(512, b"\0"))
    q, data = both_io(tmp_path, monkeypatch, [f"write -s {sig} 0 512"], fmt="raw")
    assert q.rc == 0 and data[:8] == b"vhdxfile"
