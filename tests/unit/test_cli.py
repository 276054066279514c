"""The qemu-img-like CLI without the oracle: error paths, exit codes, output shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blockdrv.cli import main
from blockdrv.cli.common import qjson, size_to_str, strtosz
from blockdrv.engines.sparse import SparseScanner


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, needle: str = "") -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("blockdrv: "), err
    assert "Traceback" not in err
    assert needle in lines[0]


@pytest.fixture
def img(tmp_path, capsys):
    path = str(tmp_path / "a.raw")
    assert main(["create", "-q", "-f", "raw", path, "1M"]) == 0
    capsys.readouterr()
    return path


# -- create -------------------------------------------------------------------------

def test_create_prints_formatting_line(tmp_path, capsys):
    path = str(tmp_path / "x.raw")
    code, out, err = run(capsys, "create", "-f", "raw", path, "1.5M")
    assert code == 0 and err == ""
    assert out == f"Formatting '{path}', fmt=raw size=1572864\n"
    assert os.path.getsize(path) == 1572864


def test_create_quiet_and_options(tmp_path, capsys):
    path = str(tmp_path / "x.raw")
    code, out, _ = run(capsys, "create", "-q", "-o", "preallocation=falloc", path, "64k")
    assert code == 0 and out == ""
    code, out, _ = run(capsys, "create", "-o", "preallocation=off", path, "64k")
    assert out.endswith("size=65536 preallocation=off\n")


def test_create_rounds_raw_size_up_to_sectors(tmp_path, capsys):
    path = str(tmp_path / "x.raw")
    assert run(capsys, "create", "-f", "raw", path, "1001")[0] == 0
    assert os.path.getsize(path) == 1024


def test_create_o_help(capsys):
    code, out, _ = run(capsys, "create", "-f", "raw", "-o", "help")
    assert code == 0
    assert out.startswith("Supported raw options:\n")
    assert "  size=<size>            - Virtual disk size\n" in out
    assert out.endswith("Specify the target filename to include those options.\n")


@pytest.mark.parametrize("argv, needle", [
    (["create", "-f", "raw", "{p}", "1Q"], "Invalid image size specified"),
    (["create", "-f", "raw", "{p}", "1.5"], "Invalid image size specified"),
    (["create", "-f", "raw", "{p}", "16E"], "Must be between 0 and 9223372036854775807"),
    (["create", "-f", "raw", "-o", "foo=bar", "{p}", "1M"], "Invalid parameter 'foo'"),
    (["create", "-f", "nope", "{p}", "1M"], "Unknown file format 'nope'"),
    (["create", "-f", "raw", "{p}"], "Image creation needs a size parameter"),
    (["create", "-f", "raw", "-o", "size=2M", "{p}", "1M"], "specified only once"),
    (["create", "-f", "raw", "-o", "size=1Q", "{p}"], "Parameter 'size' expects"),
    (["create", "-f", "raw", "-o", "preallocation=bogus", "{p}", "1M"],
     "invalid parameter value: bogus"),
])
def test_create_errors_leave_no_file(tmp_path, capsys, argv, needle):
    path = str(tmp_path / "x.raw")
    code, _, err = run(capsys, *[a.replace("{p}", path) for a in argv])
    assert code == 1
    assert_one_error(err, needle)
    assert not os.path.exists(path)


def test_usage_errors(capsys):
    for argv, msg in ((["bogus"], "Command not found: bogus"),
                      ([], "Not enough arguments"),
                      (["info"], "Expecting one image file name"),
                      (["compare", "x"], "Expecting two image file names"),
                      (["info", "--bogus", "x"], "unrecognized option '--bogus'")):
        code, _, err = run(capsys, *argv)
        assert code == 1
        assert err.splitlines()[0] == f"blockdrv: {msg}"
        assert err.splitlines()[1] == "Try 'blockdrv --help' for more information"


# -- info / check / map ----------------------------------------------------------------

def test_info_json_and_human(img, capsys):
    code, out, _ = run(capsys, "info", "-f", "raw", "--output=json", img)
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["virtual-size", "filename", "format", "actual-size", "dirty-flag"]
    assert data["virtual-size"] == 1048576 and data["format"] == "raw"
    code, out, _ = run(capsys, "info", img)
    assert out.splitlines()[:3] == [f"image: {img}", "file format: raw",
                                    "virtual size: 1 MiB (1048576 bytes)"]


@pytest.mark.parametrize("argv, needle", [
    (["info", "missing.raw"],
     "Could not open 'missing.raw': Could not open 'missing.raw': No such file or directory"),
    (["info", "-f", "bogus", "{img}"], "Unknown driver 'bogus'"),
    (["info", "--output=xml", "{img}"], "--output must be used with human or json"),
    (["map", "--start-offset=1Q", "{img}"], "Invalid start offset specified"),
])
def test_open_and_option_errors(img, capsys, argv, needle):
    code, out, err = run(capsys, *[a.replace("{img}", img) for a in argv])
    assert code == 1 and out == ""
    assert_one_error(err, needle)


def test_check_raw_not_supported(img, capsys):
    code, out, err = run(capsys, "check", "-f", "raw", img)
    assert code == 63 and out == ""
    assert_one_error(err, "This image format does not support checks")
    code, _, err = run(capsys, "check", "-r", "bogus", img)
    assert code == 1 and "expecting 'leaks' or 'all'" in err


def test_check_probed_raw_writable_warns(img, capsys):
    code, _, err = run(capsys, "check", "-r", "all", img)
    assert code == 63
    assert err.startswith(f"WARNING: Image format was not specified for '{img}' "
                          "and probing guessed raw.\n")


def test_map_json_of_sparse_file(tmp_path, capsys):
    path = tmp_path / "s.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        f.seek(256 << 10)
        f.write(b"x" * 8192)
    code, out, _ = run(capsys, "map", "-f", "raw", "--output=json", str(path))
    assert code == 0
    entries = json.loads(out)
    assert sum(e["length"] for e in entries) == 1 << 20
    assert [e["data"] for e in entries] == [False, True, False]
    assert entries[1] == {"start": 262144, "length": 8192, "depth": 0, "present": True,
                          "zero": False, "data": True, "offset": 262144}


# -- compare / convert / resize ------------------------------------------------------------

def test_compare_codes(tmp_path, img, capsys):
    other = str(tmp_path / "b.raw")
    assert main(["convert", "-f", "raw", "-O", "raw", img, other]) == 0
    assert run(capsys, "compare", "-f", "raw", "-F", "raw", img, other)[:2] == \
        (0, "Images are identical.\n")
    with open(other, "r+b") as f:
        f.seek(5000)
        f.write(b"!")
    assert run(capsys, "compare", img, other)[:2] == (1, "Content mismatch at offset 4608!\n")
    assert run(capsys, "compare", "-q", img, other)[:2] == (1, "")
    code, _, err = run(capsys, "compare", img, str(tmp_path / "none.raw"))
    assert code == 2
    assert_one_error(err, "No such file or directory")


def test_convert_failure_removes_target(tmp_path, img, capsys):
    dst = str(tmp_path / "out.raw")
    for argv, needle in ((["-O", "bogus"], "Unknown file format 'bogus'"),
                         (["-o", "foo=1"], "Invalid parameter 'foo'"),
                         (["-o", "preallocation=bogus"], "invalid parameter value"),
                         (["-S", "1000"], "Invalid buffer size for sparse output")):
        code, _, err = run(capsys, "convert", *argv, img, dst)
        assert code == 1
        assert_one_error(err, needle)
        assert not os.path.exists(dst)


def test_convert_keeps_holes_and_bytes(tmp_path, capsys):
    src = tmp_path / "src.raw"
    data = bytearray(4 << 20)
    data[1 << 20:(1 << 20) + 4096] = os.urandom(4096)
    data[3 << 20:(3 << 20) + 100] = b"y" * 100
    src.write_bytes(data)
    dst = tmp_path / "dst.raw"
    assert run(capsys, "convert", "-f", "raw", "-O", "raw", str(src), str(dst))[0] == 0
    assert dst.read_bytes() == data
    assert os.stat(dst).st_blocks * 512 <= 4096 * 4
    assert run(capsys, "convert", "-S", "0", str(src), str(tmp_path / "full.raw"))[0] == 0
    assert os.stat(tmp_path / "full.raw").st_blocks * 512 >= 4 << 20


def test_resize(img, capsys):
    assert run(capsys, "resize", "-f", "raw", img, "+1M")[:2] == (0, "Image resized.\n")
    assert os.path.getsize(img) == 2 << 20
    code, _, err = run(capsys, "resize", "-f", "raw", img, "1M")
    assert code == 1
    assert err.splitlines()[0] == "blockdrv: Use the --shrink option to perform a shrink operation."
    assert run(capsys, "resize", "-f", "raw", "--shrink", img, "-512K")[0] == 0
    assert os.path.getsize(img) == 1536 << 10
    code, _, err = run(capsys, "resize", "-f", "raw", "--shrink", img, "-5G")
    assert code == 1
    assert_one_error(err, "New image size must be positive")


def test_internal_error_is_one_line(monkeypatch, img, capsys):
    from blockdrv.cli import info

    def boom(*a, **k):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(info, "image_info", boom)
    code, _, err = run(capsys, "info", img)
    assert code == 1
    assert_one_error(err, "internal error: ZeroDivisionError: boom")


# -- helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (1000, "0.977 KiB"), (4096, "4 KiB"), (1572864, "1.5 MiB"),
    (1 << 20, "1 MiB"), (200704, "196 KiB"), ((1 << 64) - 1, "16 EiB")])
def test_size_to_str(value, text):
    assert size_to_str(value) == text


def test_strtosz():
    assert strtosz("1.5k") == 1536 and strtosz("0x10") == 16 and strtosz("1b") == 1
    assert strtosz("1.5") is None and strtosz("abc") is None and strtosz("1e3") is None


def test_qjson_key_order_is_qemus():
    text = qjson({"filename": "f", "format": "raw", "dirty-flag": False,
                  "actual-size": 1, "virtual-size": 2, "cluster-size": 3})
    assert list(json.loads(text)) == ["virtual-size", "filename", "cluster-size", "format",
                                      "actual-size", "dirty-flag"]
    assert text.startswith('{\n    "virtual-size": 2,\n')


def test_sparse_scanner_absorbs_short_gaps():
    nz = np.array([1, 1, 0, 0, 1] + [0] * 16 + [1], dtype=bool)
    scan = SparseScanner(nz, 0, 8)
    assert scan.alloc_min(0, len(nz), 8) == (True, 8)    # data, gap < 8, aligned up
    assert scan.alloc_min(8, len(nz) - 8, 8) == (False, 8)


def test_python_dash_m_end_to_end(tmp_path):
    path = str(tmp_path / "e.raw")
    res = subprocess.run([sys.executable, "-m", "blockdrv", "create", "-f", "raw", path, "1M"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("Formatting")
    res = subprocess.run([sys.executable, "-m", "blockdrv", "info", str(tmp_path / "no")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1


# -- review mends ----------------------------------------------------------------------------

def test_strtosz_is_qemu_strtosz():
    """One size parser (blockdrv.options.strtosz) behind every command:
    leading '+', exact fraction rounding, hex with a deprecation warning."""
    warnings = []
    assert strtosz("+1k") == 1024 and strtosz("1.0005k") == 1025
    assert strtosz("0x1k", warnings.append) == 1024
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x1k"]
    assert (1 << 63) < strtosz("15.99E") < 1 << 64       # no INT64 limit here
    assert strtosz("16E") == 1 << 64 and strtosz("99999999999999999999") == 1 << 64
    assert strtosz("0x1.8k") is None and strtosz("-1") is None


def test_api_sizes_use_qemu_syntax(tmp_path):
    import blockdrv
    from blockdrv.errors import InvalidArgumentError
    from blockdrv.options import parse_size
    assert parse_size("1.0005k") == 1025 and parse_size("+0x200") == 512
    with pytest.raises(InvalidArgumentError, match="value too large"):
        parse_size("8E")
    with blockdrv.create_image(tmp_path / "s.raw", "raw", "0x10000") as img:
        assert img.size == 65536
        img.resize("+0x20000")
        assert img.size == 131072


def test_create_o_size_out_of_range(tmp_path, capsys):
    code, _, err = run(capsys, "create", "-f", "raw", "-o", "size=16E", str(tmp_path / "x"))
    assert code == 1
    assert_one_error(err, "Value '16E' is out of range for parameter 'size'")


def test_dump_human_orders_nested_dicts_once():
    from blockdrv.cli.common import _qdict_bucket, dump_human, qdict_order
    assert _qdict_bucket("a-a-a") == _qdict_bucket("a-a-b")      # one QDict bucket
    inner = {"a-a-a": 1, "a-a-b": 2, "zz": 3}
    order = [k.replace("-", " ") for k in qdict_order(inner)]
    lines = dump_human({"outer": inner})
    assert lines[0] == "    outer:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == order
    assert dump_human({"outer": [inner]})[2:] == [f"{' ' * 12}{line.strip()}"
                                                  for line in lines[1:]]


def test_cache_modes_shared(tmp_path, img, capsys):
    from blockdrv.engines.common import parse_cache_mode
    assert parse_cache_mode("off") == parse_cache_mode("none")
    assert parse_cache_mode("bogus") is None
    # none/off open with O_DIRECT: bench runs through it
    code, out, err = run(capsys, "bench", "-t", "off", "-c", "1", img)
    assert code == 0, err
    assert "Run completed" in out


def test_compare_imports_numpy_only_for_a_mismatch(tmp_path, img):
    other = str(tmp_path / "b.raw")
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    with open(img, "r+b") as f:
        f.write(bytes(4096))                       # allocated zeros vs a hole
    probe = ("import sys; from blockdrv.cli import main; code = main(sys.argv[1:]); "
             "print(code, 'numpy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe, "compare", img, other],
                         capture_output=True, text=True)
    assert res.stdout.splitlines()[-1] == "0 False", res
    with open(img, "r+b") as f:
        f.seek(1500)
        f.write(b"x")
    res = subprocess.run([sys.executable, "-c", probe, "compare", img, other],
                         capture_output=True, text=True)
    assert res.stdout.splitlines() == ["Content mismatch at offset 1024!", "1 True"], res


def test_io_close_flush_failure_is_reported(monkeypatch, img):
    """qemu-io's exit: close() flushes; a failed flush is one error line, exit 1."""
    import io as _io
    from blockdrv.cli.io import run as io_run
    from blockdrv.errors import BlockIOError
    from blockdrv.node import BlockDriverState

    async def failing_flush(self):
        raise BlockIOError("Input/output error")
    closed = []
    real_close = BlockDriverState.close

    def close(self):
        try:
            real_close(self)
        finally:
            closed.append(self.closed)
    monkeypatch.setattr(BlockDriverState, "co_flush", failing_flush)
    monkeypatch.setattr(BlockDriverState, "close", close)
    out, err = _io.StringIO(), _io.StringIO()
    assert io_run(["-f", "raw", "-c", "length", img], out, err) == 1
    assert err.getvalue() == "blockdrv: Input/output error\n"
    assert closed and all(closed)


def test_frexp_exponent_is_maths():
    """size_to_str's exponent without the math module: math.frexp's, for
    the values sizes give and the awkward ones."""
    import math
    import random
    from blockdrv.cli.common import _frexp_exponent
    rnd = random.Random(7)
    values = [0, 1, 2, 3, 0.5, 0.25, 0.3, 1023, 1024, 1e-300, 2 ** 63, 2 ** 64 - 1]
    values += [rnd.random() * 10 ** rnd.randint(-6, 20) for _ in range(20000)]
    values += [v / (1000.0 / 1024.0) for v in (1 << 30, 1000, 999, 10 ** 15)]
    for v in values:
        assert _frexp_exponent(v) == math.frexp(v)[1], v
