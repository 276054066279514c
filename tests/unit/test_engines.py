"""The engines as library functions: ``blockdrv.convert``, ``blockdrv.compare``
and ``blockdrv.check`` give what the CLI and qemu-img give, raise
:mod:`blockdrv.errors` exceptions, and report progress up to 1.0."""

from __future__ import annotations

import json
import os

import pytest

import blockdrv
from blockdrv.cli import main
from blockdrv.errors import BlockDriverError, InvalidArgumentError, UnsupportedError
from blockdrv.testing.compare import compare_files, data_extents
from blockdrv.testing.qemu import qemu_img_check, run_qemu_img, run_qemu_io
from blockdrv.testing.vhdx.corrupt import MiB, Vhdx

SIZE = 12 * MiB


@pytest.fixture
def src(tmp_path):
    """Raw: data, explicit zeros, a hole, unaligned data, a zero run inside data."""
    path = tmp_path / "src.raw"
    seed = bytes(range(256)) * 4096                       # 1 MiB, no zero sector
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(seed * 2)                                 # 0 .. 2M data
        f.write(bytes(MiB))                               # 2M .. 3M written zeros
        f.seek(5 * MiB + 4096)
        f.write(seed[:MiB // 2] + bytes(64 << 10) + seed[:MiB // 2])
        f.seek(SIZE - 512)
        f.write(b"\xee" * 512)                            # the last sector
    return str(path)


def _cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def _qemu(*argv) -> None:
    rc, out, err = run_qemu_img(*map(str, argv))
    assert rc == 0, err


def test_convert_raw_to_vhdx_as_cli_and_qemu(tmp_path, src, qemu_img):
    api, cli, qemu = (str(tmp_path / f"{n}.vhdx") for n in ("api", "cli", "qemu"))
    blockdrv.convert(src, api, fmt="vhdx", src_fmt="raw")
    _cli("convert", "-f", "raw", "-O", "vhdx", src, cli)
    _qemu("convert", "-f", "raw", "-O", "vhdx", src, qemu)
    for other in (cli, qemu):
        diff = compare_files(api, other, "vhdx", extents="payload")
        assert diff is None, f"{other}: {diff}"
    assert blockdrv.compare(src, api, fmt_a="raw", fmt_b="vhdx").identical
    assert run_qemu_img("compare", "-f", "raw", "-F", "vhdx", src, api)[0] == 0


@pytest.mark.parametrize("sparse_size", [4096, 0])
def test_convert_vhdx_to_raw_as_cli_and_qemu(tmp_path, src, qemu_img, sparse_size):
    vhdx = str(tmp_path / "src.vhdx")
    _qemu("convert", "-f", "raw", "-O", "vhdx", src, vhdx)
    api, cli, qemu = (str(tmp_path / f"{n}.raw") for n in ("api", "cli", "qemu"))
    blockdrv.convert(vhdx, api, src_fmt="vhdx", sparse_size=sparse_size, coroutines=4)
    _cli("convert", "-S", sparse_size, "-f", "vhdx", "-O", "raw", vhdx, cli)
    _qemu("convert", "-S", sparse_size, "-f", "vhdx", "-O", "raw", vhdx, qemu)
    with open(api, "rb") as f:
        data = f.read()
    with open(src, "rb") as f:
        assert data == f.read()
    for other in (cli, qemu):
        with open(other, "rb") as f:
            assert f.read() == data, other
        assert data_extents(other) == data_extents(api), other    # as sparse


def test_convert_several_sources_and_create_options(tmp_path, src):
    out = tmp_path / "cat.vhdx"
    blockdrv.convert([src, src], out, fmt="vhdx", src_fmt="raw",
                     options={"subformat": "fixed", "block_size": "2M"})
    with blockdrv.open_image(out) as img:
        assert img.size == 2 * SIZE and img.format == "vhdx"
        assert img.read(SIZE, 2 * MiB) == img.read(0, 2 * MiB) != bytes(2 * MiB)
        assert img.info().cluster_size == 2 * MiB


def _recorder():
    seen: list[float] = []
    return seen, seen.append


@pytest.mark.parametrize("coroutines", [1, 4])
def test_convert_progress_is_monotonic_up_to_one(tmp_path, src, coroutines):
    seen, cb = _recorder()
    blockdrv.convert(src, tmp_path / "o.raw", src_fmt="raw", coroutines=coroutines,
                     progress=cb)
    assert len(seen) > 3                      # per extent, not just start and end
    assert seen == sorted(seen) and seen[0] >= 0.0 and seen[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in seen)


def test_progress_of_an_empty_image_reaches_one(tmp_path):
    empty = tmp_path / "e.raw"
    empty.write_bytes(b"")
    seen, cb = _recorder()
    blockdrv.convert(empty, tmp_path / "o.vhdx", fmt="vhdx", src_fmt="raw", progress=cb)
    assert seen[-1] == 1.0
    seen.clear()
    assert blockdrv.compare(empty, tmp_path / "o.vhdx", progress=cb).identical
    assert seen[-1] == 1.0


def test_convert_errors_are_library_errors_and_leave_no_target(tmp_path, src):
    out = tmp_path / "o.vhdx"
    with pytest.raises(InvalidArgumentError, match="Invalid number of coroutines"):
        blockdrv.convert(src, out, coroutines=17)
    with pytest.raises(InvalidArgumentError, match="Invalid buffer size for sparse"):
        blockdrv.convert(src, out, sparse_size=1000)
    with pytest.raises(InvalidArgumentError, match="Invalid cache option: bogus"):
        blockdrv.convert(src, out, cache="bogus")
    with pytest.raises(BlockDriverError, match="^Could not open '.*nothere'"):
        blockdrv.convert(tmp_path / "nothere", out)
    with pytest.raises(InvalidArgumentError, match="same file as source"):
        blockdrv.convert(src, src, src_fmt="raw")
    assert os.path.getsize(src) == SIZE                   # the guard ran first

    def stop(fraction):
        if fraction > 0.3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        blockdrv.convert(src, out, fmt="vhdx", src_fmt="raw", progress=stop)
    assert not out.exists()                               # created, then removed


def test_convert_skip_create_needs_a_large_enough_target(tmp_path, src):
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(MiB))
    with pytest.raises(InvalidArgumentError, match="output file is smaller"):
        blockdrv.convert(src, small, src_fmt="raw", skip_create=True)
    assert small.exists()                                 # not ours to remove
    big = tmp_path / "big.raw"
    big.write_bytes(b"\xff" * SIZE)
    blockdrv.convert(src, big, src_fmt="raw", skip_create=True)
    assert big.read_bytes() == open(src, "rb").read()


# -- compare ----------------------------------------------------------------------------

def test_compare_finds_the_first_difference(tmp_path, src, qemu_img):
    other = tmp_path / "other.raw"
    other.write_bytes(open(src, "rb").read())
    res = blockdrv.compare(src, other, fmt_a="raw", fmt_b="raw")
    assert isinstance(res, blockdrv.CompareResult)
    assert res.identical and res.offset is None and not res.size_mismatch
    with open(other, "r+b") as f:
        f.seek(5 * MiB + 4096 + 700)
        f.write(b"\x01")
        f.seek(9 * MiB)                                   # a later one, in the hole
        f.write(b"\x01")
    res = blockdrv.compare(src, other, fmt_a="raw", fmt_b="raw")
    assert not res.identical and res.mismatch == "content"
    assert res.offset == 5 * MiB + 4096 + 512             # its 512-byte sector
    rc, out, _ = run_qemu_img("compare", "-f", "raw", "-F", "raw", src, str(other))
    assert rc == 1 and out.strip() == f"Content mismatch at offset {res.offset}!"


def test_compare_sizes_as_qemu_img(tmp_path, src):
    longer = tmp_path / "longer.raw"
    longer.write_bytes(open(src, "rb").read() + bytes(MiB))
    res = blockdrv.compare(src, longer, fmt_a="raw", fmt_b="raw")
    assert res.identical and res.size_mismatch            # extra part reads as zeros
    strict = blockdrv.compare(src, longer, fmt_a="raw", fmt_b="raw", strict=True)
    assert strict.mismatch == "size" and strict.offset is None
    with open(longer, "r+b") as f:
        f.seek(SIZE + 4096)
        f.write(b"x")
    res = blockdrv.compare(longer, src, fmt_a="raw", fmt_b="raw")
    assert res.mismatch == "content" and res.offset == SIZE + 4096


def test_compare_open_error_is_a_library_error(tmp_path, src):
    with pytest.raises(BlockDriverError, match="^Could not open"):
        blockdrv.compare(src, tmp_path / "nothere")


# -- check ------------------------------------------------------------------------------

@pytest.fixture
def corrupt(tmp_path, qemu_img, qemu_io):
    """A qemu-made VHDX whose block 7 points past the end of the file."""
    path = str(tmp_path / "c.vhdx")
    assert run_qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path,
                        "64M")[0] == 0
    assert run_qemu_io(path, ["write -P 0x41 0 1M"], "vhdx")[0] == 0
    v = Vhdx.load(path)
    v.set_block(7, 6, 100 * MiB)
    return v.save(path)


def test_check_returns_the_counters(corrupt, qemu_img, capsys):
    q_rc, q_data = qemu_img_check(corrupt)
    res = blockdrv.check(corrupt)
    assert q_rc == 2 and res.corruptions == q_data["corruptions"] >= 1
    assert res.corruptions_fixed == 0 and res.messages
    # the CLI prints the same counters
    capsys.readouterr()
    assert main(["check", "--output=json", corrupt]) == 2
    cli = json.loads(capsys.readouterr().out)
    assert cli["corruptions"] == res.corruptions and cli["check-errors"] == 0
    fixed = blockdrv.check(corrupt, repair="all")
    assert fixed.corruptions == 0 and fixed.corruptions_fixed == res.corruptions
    assert blockdrv.check(corrupt) == blockdrv.check(corrupt, fmt="vhdx")
    assert blockdrv.check(corrupt).corruptions == 0
    assert qemu_img_check(corrupt)[0] == 0


def test_check_errors(tmp_path, src):
    with pytest.raises(UnsupportedError, match="does not support checks"):
        blockdrv.check(src, fmt="raw")
    with pytest.raises(InvalidArgumentError, match="expecting 'leaks' or 'all'"):
        blockdrv.check(src, repair="everything")
