"""Probing never guesses dangerously: formats qemu-img 7.2 recognises are
named and refused (never opened as raw), and a probed raw image refuses
writes that would make block 0 probe as another format.  No qemu needed:
the images are hand-made (blockdrv.testing.foreign); the interop twin of
this file checks the same against qemu-made images and qemu-io."""

from __future__ import annotations

import errno
import os
import warnings

import pytest

import blockdrv
from blockdrv import block, plugins
from blockdrv.cli import main
from blockdrv.hookspecs import hookimpl
from blockdrv.common import O_RDWR
from blockdrv.probe import match_signature, probe_buffer
from blockdrv.testing import foreign
from blockdrv.testing.qemu import run_blockdrv_io

FORMATS = {  # hand-made first sector -> the format qemu names (and blockdrv refuses)
    "qcow": "qcow", "vmdk": "vmdk", "vmdk3": "vmdk",
    "vmdk-descriptor": "vmdk", "vdi": "vdi", "vpc": "vpc", "qed": "qed",
    "parallels": "parallels", "parallels-ext": "parallels", "luks": "luks",
    "bochs": "bochs", "cloop": "cloop",
}


def refusal(path, fmt: str) -> str:
    return f"Could not open '{path}': Image is in {fmt} format, which blockdrv does not support"


def image(tmp_path, kind: str, size: int = 64 << 10, name: str | None = None) -> str:
    path = tmp_path / (name or f"img.{kind}")
    data = foreign.header(kind)
    path.write_bytes(data + bytes(max(0, size - len(data))))
    return str(path)


def snapshot(path: str):
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mtime_ns


@pytest.mark.parametrize("kind", sorted(FORMATS) + ["qcow2"])
def test_signature_names_the_format(kind):
    want = FORMATS.get(kind, kind)
    assert match_signature(probe_buffer(foreign.header(kind)), "x.img")[0] == want


def test_qcow2_now_opens(tmp_path):
    # the built-in qcow2 driver took the format over from the refusal table
    path = str(tmp_path / "img.qcow2")
    block.create(path, "qcow2", {"size": "1M"})
    with block.open_node(path) as bs:
        assert bs.format_name == "qcow2" and bs.total_size == 1 << 20
    # a bare signature is no valid qcow2 image: the driver refuses it, as qemu
    with pytest.raises(blockdrv.BlockDriverError):
        block.open_node(image(tmp_path, "qcow2"))


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_open_node_refuses_and_fmt_raw_opens(tmp_path, kind):
    path = image(tmp_path, kind)
    before = snapshot(path)
    for flags in (0, O_RDWR):
        with pytest.raises(blockdrv.UnsupportedError) as exc:
            block.open_node(path, None, flags)
        assert str(exc.value) == (f"Image is in {FORMATS[kind]} format, which blockdrv "
                                  "does not support")
    with blockdrv.open_image(path, "raw") as img:       # the user's explicit choice
        assert img.format == "raw" and img.read(0, 4) == foreign.header(kind)[:4]
    assert snapshot(path) == before


@pytest.mark.parametrize("text", [
    b"# Disk DescriptorFile\nversion=1\n",
    b"#c1\n#c2\n   \n  \r\nversion=3\r\n",
    b"version=2\n",
])
def test_vmdk_descriptor_forms(text):
    assert match_signature(probe_buffer(text), None)[0] == "vmdk"


@pytest.mark.parametrize("text", [
    b"\nversion=1\n",                   # an empty line is no blank line for qemu
    b"# Disk DescriptorFile\nversion=4\n",
    b"# Disk DescriptorFile\nCID=1\nversion=1\n",
    b"  x\nversion=1\n",
    b"#" + b"x" * 600 + b"\nversion=1\n",   # beyond the 512 bytes qemu probes
])
def test_vmdk_descriptor_lookalikes_are_raw(text):
    assert match_signature(probe_buffer(text), None)[0] is None


def test_probe_sees_512_zero_padded_bytes(tmp_path):
    # qemu reads one zero-padded sector: a file holding only the first line
    # of the cloop preamble is no cloop image (the padding does not match)
    path = tmp_path / "short.img"
    path.write_bytes(foreign.CLOOP_PREAMBLE[:10])
    with block.open_node(str(path)) as bs:
        assert bs.format_name == "raw" and bs.probed_raw


def test_fixed_vhd_footer_only_probes_raw(tmp_path):
    # qemu 7.2's vpc_probe looks for "conectix" at offset 0 only
    path = tmp_path / "fixed.vhd"
    path.write_bytes(bytes(4096) + foreign.header("vpc"))
    with block.open_node(str(path)) as bs:
        assert bs.format_name == "raw"


def test_dmg_is_found_by_name(tmp_path):
    (tmp_path / "a.dmg").write_bytes(foreign.dmg())
    (tmp_path / "a.img").write_bytes(foreign.dmg())
    (tmp_path / "b.dmg").write_bytes(foreign.dmg(koly=False))
    with pytest.raises(blockdrv.UnsupportedError, match="Image is in dmg format"):
        block.open_node(str(tmp_path / "a.dmg"))
    with pytest.raises(blockdrv.InvalidArgumentError,
                       match="^Could not locate UDIF trailer in dmg file$"):
        block.open_node(str(tmp_path / "b.dmg"))
    with block.open_node(str(tmp_path / "a.img")) as bs:
        assert bs.format_name == "raw"


@pytest.mark.parametrize("kind", ["qcow", "vmdk-descriptor", "bochs"])
@pytest.mark.parametrize("argv", [
    ["info"], ["map"], ["check"], ["convert", "-O", "raw"], ["compare"],
    ["resize"], ["bench", "-c", "1"],
])
def test_cli_refuses(tmp_path, capsys, kind, argv):
    path = image(tmp_path, kind)
    before = snapshot(path)
    args = [*argv, path]
    if argv[0] == "convert":
        args.append(str(tmp_path / "out.raw"))
    elif argv[0] == "compare":
        args.append(path)
    elif argv[0] == "resize":
        args.append("+1M")
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert err == f"blockdrv: {refusal(path, FORMATS[kind])}\n"
    assert snapshot(path) == before
    assert not (tmp_path / "out.raw").exists()


def test_io_refuses(tmp_path):
    path = image(tmp_path, "qcow")
    before = snapshot(path)
    rc, out, err = run_blockdrv_io(path, ["write -P 1 0 512"])
    assert (rc, out) == (1, "")
    assert err == (f"blockdrv: can't open device {path}: Image is in qcow format, "
                   "which blockdrv does not support\n")
    assert snapshot(path) == before


def test_create_with_foreign_backing_refuses(tmp_path, capsys):
    parent = image(tmp_path, "vmdk")
    child = str(tmp_path / "child.vhdx")
    assert main(["create", "-f", "vhdx", "-b", parent, child]) == 1
    assert capsys.readouterr().err == (f"blockdrv: {child}: Could not open backing file "
                                       f"'{parent}': Image is in vmdk format, which "
                                       "blockdrv does not support\n")
    with pytest.raises(blockdrv.UnsupportedError, match="Image is in vmdk format"):
        blockdrv.create_image(child, "vhdx", "1M", backing_file=parent)
    assert not os.path.exists(child)


class _FakeVmdk:
    """Stands for a future vmdk driver plugin."""

    format_name, protocol_name = "vmdk", None

    @hookimpl
    def bdrv_probe(self, buf, filename):
        return 100 if buf[:4] == b"KDMV" else 0

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        bs.total_size = 512


def test_a_registered_driver_takes_over(tmp_path, monkeypatch):
    reg = plugins.DriverRegistry()
    reg.load_entry_points()
    reg.register(_FakeVmdk())
    monkeypatch.setattr(plugins, "_registry", reg)
    with block.open_node(image(tmp_path, "vmdk")) as bs:
        assert bs.format_name == "vmdk"
    # its probe ignores descriptors, but the table still hands it the image
    with block.open_node(image(tmp_path, "vmdk-descriptor")) as bs:
        assert bs.format_name == "vmdk"


# -- block 0 of a probed raw image ---------------------------------------------


@pytest.fixture
def raw_file(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return str(path)


def open_probed(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = blockdrv.open_image(path, readonly=False)
    assert [w.category for w in caught] == [blockdrv.ProbedRawWarning]
    assert "probing guessed raw" in str(caught[0].message)
    return img


@pytest.mark.parametrize("kind", ["qcow2", "vmdk-descriptor", "luks", "cloop", "vhdx"])
def test_api_refuses_a_foreign_block0(raw_file, kind):
    sector = (b"vhdxfile" if kind == "vhdx" else foreign.header(kind)).ljust(512, b"\0")
    before = snapshot(raw_file)
    with open_probed(raw_file) as img:
        with pytest.raises(blockdrv.ReadOnlyError) as exc:
            img.write(0, sector + b"more")
        assert exc.value.errno == errno.EPERM
        img.write(512, sector)            # beyond block 0: any data
    data, _ = snapshot(raw_file)
    assert data[:512] == before[0][:512] and data[512:1024] == sector


def test_api_checks_the_merged_sector(raw_file):
    with open_probed(raw_file) as img:
        img.write(3, b"V")
        with pytest.raises(blockdrv.ReadOnlyError):
            img.write(0, b"KDM")          # "KDMV" only once merged with byte 3
        img.write(0, b"KDX")
        assert img.read(0, 4) == b"KDXV"


def test_api_allows_raw_looking_block0_and_zeroes(raw_file):
    with open_probed(raw_file) as img:
        img.write(0, b"hello, raw" * 60)
        img.write_zeroes(0, 512)
        img.write_zeroes(0, 3)
        img.discard(0, 512)
        img.write(0, b"Q")
        assert img.read(0, 2) == b"Q\0"


def test_explicit_raw_and_readonly_opens_are_not_restricted(raw_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with blockdrv.open_image(raw_file) as img:        # read-only: no warning
            assert img.format == "raw"
        with blockdrv.open_image(raw_file, "raw", readonly=False) as img:
            img.write(0, b"vhdxfile")
    assert snapshot(raw_file)[0][:8] == b"vhdxfile"


def test_io_refuses_a_foreign_block0(raw_file, tmp_path):
    sig = tmp_path / "sig.bin"
    sig.write_bytes(foreign.header("qcow2"))
    before = snapshot(raw_file)
    rc, out, err = run_blockdrv_io(raw_file, [f"write -s {sig} 0 512"])
    assert (rc, out) == (1, "write failed: Operation not permitted\n")
    assert err.startswith("WARNING: Image format was not specified")
    assert snapshot(raw_file)[0] == before[0]
    rc, out, _ = run_blockdrv_io(raw_file, [f"write -s {sig} 0 512"], fmt="raw")
    assert rc == 0 and snapshot(raw_file)[0][:4] == b"QFI\xfb"
