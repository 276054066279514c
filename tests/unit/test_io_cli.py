"""``blockdrv io``: command parsing and output formats.

Expected lines were recorded from qemu-io 7.2 (Debian qemu-utils); the live
comparison is tests/interop/test_raw_io.py.
"""

from __future__ import annotations

import io

import pytest

from blockdrv.cli.io import (SizeError, format_size, normalize_qemu_io_output,
                             parse_size, run)


def bio(path, *commands, fmt="raw", readonly=False):
    argv = (["-f", fmt] if fmt else []) + (["-r"] if readonly else [])
    for c in commands:
        argv += ["-c", c]
    out, err = io.StringIO(), io.StringIO()
    rc = run(argv + [str(path)], out, err)
    return rc, normalize_qemu_io_output(out.getvalue()), normalize_qemu_io_output(err.getvalue())


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "t.raw"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


T = "TIME (RATE/sec and RATE ops/sec)"


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("4k", 4096), ("4K", 4096), ("1M", 1 << 20), ("1b", 1),
    ("1B", 1), ("0x10", 16), ("0X10", 16), ("010", 10), ("+1", 1), ("1.5k", 1536),
    ("1.k", 1024), ("1.0", 1), ("0.5k", 512), ("1.0005k", 1025), ("1.0015k", 1026),
    ("1.1111111k", 1138), ("7E", 7 << 60), ("1t", 1 << 40), ("0x1k", 1024),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,code", [
    ("abc", "EINVAL"), ("1x", "EINVAL"), ("1kb", "EINVAL"), ("1e3", "EINVAL"),
    ("1.5", "EINVAL"), (".5k", "EINVAL"), ("0x1.8k", "EINVAL"), ("-1", "EINVAL"),
    ("", "EINVAL"), ("8E", "ERANGE"), ("16E", "ERANGE"),
    ("99999999999999999999", "ERANGE"),
])
def test_parse_size_errors(text, code):
    import errno
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert info.value.code == getattr(errno, code)


@pytest.mark.parametrize("value,text", [
    (0, "0 bytes"), (3, "3 bytes"), (512, "512 bytes"), (1024, "1 KiB"),
    (1536, "1.500 KiB"), (1025, "1.001 KiB"), (65536, "64 KiB"), (1024000, "1000 KiB"),
    (1 << 20, "1 MiB"), (40 << 40, "40 TiB"), (0.5, "0.500000 bytes"),
])
def test_format_size(value, text):
    assert format_size(value) == text


def test_normalize_masks_timings_only():
    raw = ("wrote 65536/65536 bytes at offset 0\n"
           "64 KiB, 1 ops; 00.00 sec (135.614 MiB/sec and 2169.8187 ops/sec)\n"
           "512,1,0:00:00.00,4736311.412,9250.608\n"
           "qemu-io: Block node is read-only\n")
    assert normalize_qemu_io_output(raw) == (
        "wrote 65536/65536 bytes at offset 0\n"
        f"64 KiB, 1 ops; {T}\n"
        "512,1,TIME,RATE,RATE\n"
        "PROG: Block node is read-only\n")


def test_write_read_report_lines(img):
    rc, out, err = bio(img, "write -P 0x41 1 3", "read -P 0x41 1 3", "write 0 64k")
    assert (rc, err) == (0, "")
    assert out == ("wrote 3/3 bytes at offset 1\n"
                   f"3 bytes, 1 ops; {T}\n"
                   "read 3/3 bytes at offset 1\n"
                   f"3 bytes, 1 ops; {T}\n"
                   "wrote 65536/65536 bytes at offset 0\n"
                   f"64 KiB, 1 ops; {T}\n")


def test_pattern_failure_reports_and_fails(img):
    rc, out, _ = bio(img, "read -P 0x42 0 512", "read 0 512")
    assert rc == 1
    assert out.splitlines()[0] == "Pattern verification failed at offset 0, 512 bytes"
    assert out.count("read 512/512 bytes at offset 0") == 2


def test_hexdump_format(img):
    rc, out, _ = bio(img, "write -P 0x41 1 3", "read -v 0 40", "read -v 1 17")
    assert rc == 0
    lines = out.splitlines()
    assert lines[2:5] == [
        "00000000:  00 41 41 41 00 00 00 00 00 00 00 00 00 00 00 00  .AAA............",
        "00000010:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................",
        "00000020:  00 00 00 00 00 00 00 00  ........",
    ]
    assert lines[7:9] == [
        "00000001:  41 41 41 00 00 00 00 00 00 00 00 00 00 00 00 00  AAA.............",
        "00000011:  00  .",
    ]


def test_out_of_range_is_eio(img):
    rc, out, _ = bio(img, "read 1M 512", "write 1023k 2k", "discard 2M 512", "read 2M 0",
                     "read 1M 0")
    assert rc == 1
    assert out.splitlines()[:4] == ["read failed: Input/output error",
                                    "write failed: Input/output error",
                                    "discard failed: Input/output error",
                                    "read failed: Input/output error"]
    assert "read 0/0 bytes at offset 1048576" in out


def test_argument_errors(img):
    rc, out, err = bio(img, "read abc 1", "read -P 300 0 1", "read 0", "bogus",
                       "write -z -P 1 0 512", "write -u 0 4k", "write -n 0 1",
                       "read 0 2G", "write 0 3G", "discard 0 3G", "read 0 1 2",
                       "read -x 0 1", "read -s 1 0 4", "read -P 0 -l 5 0 4",
                       "flush x", "truncate")
    assert rc == 1
    usage = ("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
             "reads a number of bytes at a specified offset")
    assert out.splitlines() == [
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc",
        "300 is not a valid pattern byte",
        "Only one of -z, -P, and -s can be specified at the same time",
        "-u requires -z to be specified",
        "-n requires -z to be specified",
        "length cannot exceed 2147483136, given 2G",
        "length cannot exceed 2147483136 without -n, given 3G",
        "length cannot exceed 2147483136, given 3G",
        usage, usage, usage,
        "pattern verification range exceeds end of read data",
    ]
    assert err.splitlines() == [
        "bad argument count 1 to read, expected at least 2 arguments",
        'command "bogus" not found',
        "read: invalid option -- 'x'",
        "bad argument count 1 to flush, expected 0 arguments",
        "bad argument count 0 to truncate, expected between 1 and 3 arguments",
    ]


def test_options_after_operands_and_attached_args(img):
    rc, out, _ = bio(img, "read 0 512 -P 1", "read -P0 0 1", "read -qv 0 1")
    assert rc == 1
    assert out.splitlines()[0] == "Pattern verification failed at offset 0, 512 bytes"
    assert out.count("read 1/1") == 1               # -q prints nothing


def test_info_map_length_alloc(img):
    rc, out, _ = bio(img, "info", "map", "length", "alloc 64k", "alloc 0 2M", "truncate 1001",
                     "length")
    assert rc == 0
    assert out.splitlines() == [
        "format name: raw", "cluster size: 0 bytes", "vm state offset: 0 bytes",
        "1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)",
        "1 MiB",
        "512/512 bytes allocated at offset 64 KiB",
        "1048576/1048576 bytes allocated at offset 0 bytes",
        "1 KiB",
    ]
    assert img.stat().st_size == 1001


def test_read_only(img):
    rc, out, err = bio(img, "write 0 1", "discard 0 1", "truncate 0", "read 0 1",
                       readonly=True)
    assert rc == 1
    assert err == "PROG: Block node is read-only\n" * 3
    assert out.startswith("read 1/1 bytes at offset 0\n")


def test_zero_and_discard_change_data(img):
    rc, out, _ = bio(img, "write -P 0x55 0 64k", "write -z 4k 4k", "write -z -u 8k 100",
                     "discard 1 1", "read -P 0 4k 4k", "read -P 0 8k 100", "read -P 0 1 1",
                     "read -P 0x55 2 4094")
    assert rc == 0, out
    assert "Pattern verification failed" not in out


def test_big_pattern_io_streams(img, tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(20 << 20)
    rc, out, _ = bio(big, "write -P 0x5a 1 9M", "read -P 0x5a 1 9M", "read -P 0 0 1",
                     "read -P 0 9437185 1M")
    assert rc == 0, out


def test_quit_stops_the_script(img):
    rc, out, _ = bio(img, "quit", "read 0 1")
    assert (rc, out) == (0, "")


def test_open_errors(tmp_path):
    rc, out, err = bio(tmp_path / "missing.raw", "read 0 1")
    assert rc == 1 and out == ""
    assert err == (f"PROG: can't open device {tmp_path / 'missing.raw'}: Could not open "
                   f"'{tmp_path / 'missing.raw'}': No such file or directory\n")
    rc, _, err = bio(tmp_path / "missing.raw", fmt="bogus")
    assert rc == 1 and "Unknown driver 'bogus'" in err


def test_probe_warning_only_when_writable(img):
    _, _, err = bio(img, "read 0 1", fmt=None)
    assert err.startswith("WARNING: Image format was not specified for")
    _, _, err = bio(img, "read 0 1", fmt=None, readonly=True)
    assert err == ""
