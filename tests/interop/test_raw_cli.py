"""The CLI against qemu-img 7.2 for raw images: same output, same exit codes,
same files (bytes and holes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blockdrv.cli import main
from blockdrv.testing.compare import data_extents

pytestmark = pytest.mark.interop


def qemu(qemu_img, *args, cwd=None):
    res = subprocess.run([qemu_img, *args], capture_output=True, text=True, cwd=cwd)
    return res.returncode, res.stdout, res.stderr


def ours(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def same_error(ours_err: str, qemu_err: str) -> None:
    """Same message, modulo the program name and qemu's line breaks."""
    q = " ".join(line.removeprefix("qemu-img: ") for line in qemu_err.splitlines()
                 if not line.startswith("Try "))
    o = " ".join(line.removeprefix("blockdrv: ") for line in ours_err.splitlines()
                 if not line.startswith("Try "))
    assert o == q


def sparse_file(path, size, extents):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)
    return str(path)


@pytest.fixture
def holes(tmp_path):
    """A raw file with several holes, a zero-filled (allocated) range and an
    unaligned tail."""
    return sparse_file(tmp_path / "h.raw", 10 << 20, [
        (1 << 20, b"abc"), (50 << 16, os.urandom(3 << 16)), (100 << 16, bytes(3 << 16)),
        ((9 << 20) + 12345, b"tail" * 1000)])


def test_create_line_and_file(tmp_path, capsys, qemu_img):
    for size in ("1M", "1.5M", "1001", "0"):
        a, b = tmp_path / "a.raw", tmp_path / "b.raw"
        qc, qout, _ = qemu(qemu_img, "create", "-f", "raw", "a.raw", size, cwd=tmp_path)
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            oc, oout, _ = ours(capsys, "create", "-f", "raw", "b.raw", size)
        finally:
            os.chdir(cwd)
        assert (oc, oout) == (qc, qout.replace("'a.raw'", "'b.raw'"))
        assert a.read_bytes() == b.read_bytes()
        assert data_extents(str(a)) == data_extents(str(b))


@pytest.mark.parametrize("args", [["-f", "raw", "-o", "help"], ["-f", "raw", "x.raw", "1Q"],
                                  ["-f", "raw", "-o", "foo=bar", "x.raw", "1M"],
                                  ["-f", "nope", "x.raw", "1M"], ["-f", "raw", "x.raw"],
                                  ["-f", "raw", "x.raw", "16E"]])
def test_create_errors_match(tmp_path, capsys, qemu_img, args):
    qc, qout, qerr = qemu(qemu_img, "create", *args, cwd=tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        oc, oout, oerr = ours(capsys, "create", *args)
    finally:
        os.chdir(cwd)
    assert oc == qc
    if qc:
        same_error(oerr, qerr)
        assert not (tmp_path / "x.raw").exists()
    else:  # -o help: ours lists preallocation too (a file-protocol option in QEMU)
        assert oout.splitlines()[0] == qout.splitlines()[0]


@pytest.mark.parametrize("output", ["json", "human"])
def test_info_matches(tmp_path, capsys, qemu_img, holes, output):
    made = str(tmp_path / "made.raw")
    qemu(qemu_img, "create", "-f", "raw", made, "3M")
    for path in (holes, made):
        for fmt in ([], ["-f", "raw"]):
            q = qemu(qemu_img, "info", *fmt, f"--output={output}", path)
            o = ours(capsys, "info", *fmt, f"--output={output}", path)
            assert o == q


@pytest.mark.parametrize("extra", [[], ["--start-offset=1000", "--max-length=5000000"],
                                   ["--start-offset=9M"], ["--start-offset=20M"]])
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_matches(capsys, qemu_img, holes, extra, output):
    q = qemu(qemu_img, "map", "-f", "raw", f"--output={output}", *extra, holes)
    o = ours(capsys, "map", "-f", "raw", f"--output={output}", *extra, holes)
    assert o == q


def test_map_of_empty_and_created(tmp_path, capsys, qemu_img):
    for size in ("0", "1M"):
        path = str(tmp_path / f"e{size}.raw")
        assert main(["create", "-q", "-f", "raw", path, size]) == 0
        for output in ("json", "human"):
            assert ours(capsys, "map", f"--output={output}", path) == \
                qemu(qemu_img, "map", f"--output={output}", path)


@pytest.mark.parametrize("args", [[], ["-f", "raw"], ["-q"], ["--output=json"],
                                  ["-r", "leaks", "-f", "raw"], ["-r", "bogus"],
                                  ["--output=xml"]])
def test_check_codes_match(capsys, qemu_img, holes, args):
    qc, qout, qerr = qemu(qemu_img, "check", *args, holes)
    oc, oout, oerr = ours(capsys, "check", *args, holes)
    assert (oc, oout) == (qc, qout)
    same_error(oerr, qerr)


def test_check_missing_file(capsys, qemu_img, tmp_path):
    path = str(tmp_path / "none.raw")
    qc, _, qerr = qemu(qemu_img, "check", path)
    oc, _, oerr = ours(capsys, "check", path)
    assert oc == qc == 1
    same_error(oerr, qerr)


def _variants(tmp_path, holes):
    import shutil
    same = str(tmp_path / "same.raw")
    subprocess.run(["cp", "--sparse=always", holes, same], check=True)
    diff = str(tmp_path / "diff.raw")
    shutil.copyfile(holes, diff)
    with open(diff, "r+b") as f:
        f.seek(3300000)
        f.write(b"X")
    bigger = str(tmp_path / "bigger.raw")
    subprocess.run(["cp", "--sparse=always", holes, bigger], check=True)
    os.truncate(bigger, 12 << 20)
    bigger_diff = str(tmp_path / "bigger_diff.raw")
    subprocess.run(["cp", "--sparse=always", bigger, bigger_diff], check=True)
    with open(bigger_diff, "r+b") as f:
        f.seek(11000000)
        f.write(b"Y")
    zeroed = str(tmp_path / "zeroed.raw")
    subprocess.run(["cp", "--sparse=always", holes, zeroed], check=True)
    with open(zeroed, "r+b") as f:
        f.seek(40960)
        f.write(bytes(4096))
    return {"same": same, "diff": diff, "bigger": bigger, "bigger_diff": bigger_diff,
            "zeroed": zeroed, "missing": str(tmp_path / "missing.raw")}


@pytest.mark.parametrize("flags", [[], ["-s"], ["-q"], ["-f", "raw", "-F", "raw"]])
def test_compare_matches(tmp_path, capsys, qemu_img, holes, flags):
    for name, other in _variants(tmp_path, holes).items():
        for pair in ((holes, other), (other, holes)):
            q = qemu(qemu_img, "compare", *flags, *pair)
            o = ours(capsys, "compare", *flags, *pair)
            assert o[:2] == q[:2], name
            same_error(o[2], q[2])


@pytest.mark.parametrize("sparse", [None, "0", "512", "64k"])
def test_convert_same_bytes_and_holes(tmp_path, capsys, qemu_img, holes, sparse):
    extra = ["-S", sparse] if sparse is not None else []
    q, o = str(tmp_path / "q.raw"), str(tmp_path / "o.raw")
    assert qemu(qemu_img, "convert", "-f", "raw", "-O", "raw", *extra, holes, q)[0] == 0
    assert ours(capsys, "convert", "-f", "raw", "-O", "raw", *extra, holes, o)[:2] == (0, "")
    with open(q, "rb") as fq, open(o, "rb") as fo:
        assert fq.read() == fo.read()
    assert data_extents(o) == data_extents(q)
    if sparse != "0":
        assert len(data_extents(o)) > 1


def test_convert_scattered_zero_runs(tmp_path, capsys, qemu_img):
    """Zero runs of every length and alignment: qemu-img's sparse rules."""
    import random
    rnd = random.Random(7)
    data = bytearray(5 * (1 << 20) + 1536)
    pos = 0
    while pos < len(data):
        n = rnd.choice([512, 1024, 1536, 4096, 8192, 3584, 65536, 300000])
        if rnd.random() < 0.5:
            data[pos:pos + n] = rnd.randbytes(min(n, len(data) - pos))
        pos += n
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    for sparse in ("4k", "1k", "64k"):
        q, o = str(tmp_path / f"q{sparse}.raw"), str(tmp_path / f"o{sparse}.raw")
        qemu(qemu_img, "convert", "-S", sparse, "-O", "raw", str(src), q)
        assert main(["convert", "-S", sparse, "-O", "raw", str(src), o]) == 0
        with open(o, "rb") as f:
            assert f.read() == data
        assert data_extents(o) == data_extents(q), sparse


def test_convert_n_into_existing(tmp_path, capsys, qemu_img, holes):
    q, o = str(tmp_path / "q.raw"), str(tmp_path / "o.raw")
    junk = os.urandom(11 << 20)
    for path in (q, o):
        with open(path, "wb") as f:
            f.write(junk)
    assert qemu(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", holes, q)[0] == 0
    assert ours(capsys, "convert", "-n", "-f", "raw", "-O", "raw", holes, o)[0] == 0
    with open(q, "rb") as fq, open(o, "rb") as fo:
        assert fq.read() == fo.read()
    assert data_extents(o) == data_extents(q)


@pytest.mark.parametrize("steps", [
    [["2M"], ["1M"], ["--shrink", "1M"], ["+1M"], ["--shrink", "-512K"], ["4000001"],
     ["--shrink", "-5G"], ["1Q"], ["-q", "3M"]],
])
def test_resize_matches(tmp_path, capsys, qemu_img, steps):
    q, o = str(tmp_path / "q.raw"), str(tmp_path / "o.raw")
    qemu(qemu_img, "create", "-q", "-f", "raw", q, "1M")
    assert main(["create", "-q", "-f", "raw", o, "1M"]) == 0
    for step in steps:
        *flags, size = step
        qc, qout, qerr = qemu(qemu_img, "resize", "-f", "raw", *flags, q, size)
        oc, oout, oerr = ours(capsys, "resize", "-f", "raw", *flags, o, size)
        assert (oc, oout) == (qc, qout), step
        same_error(oerr, qerr)
        assert os.path.getsize(o) == os.path.getsize(q)
        assert data_extents(o) == data_extents(q)


def test_probed_raw_warning_matches(tmp_path, qemu_img):
    path = str(tmp_path / "w.raw")
    qemu(qemu_img, "create", "-q", "-f", "raw", path, "1M")
    q = subprocess.run([qemu_img, "resize", path, "2M"], capture_output=True, text=True)
    o = subprocess.run([sys.executable, "-m", "blockdrv", "resize", path, "3M"],
                       capture_output=True, text=True)
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr)


def test_end_to_end_subprocess(tmp_path, qemu_img):
    """The installed entry point, as a user runs it: create, convert, compare."""
    src = str(tmp_path / "s.raw")
    dst = str(tmp_path / "d.raw")
    run = [sys.executable, "-m", "blockdrv"]
    assert subprocess.run(run + ["create", "-q", "-f", "raw", src, "4M"]).returncode == 0
    with open(src, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"payload" * 100)
    res = subprocess.run(run + ["convert", "-p", "-O", "raw", src, dst],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "(100.00/100%)" in res.stderr
    q = subprocess.run([qemu_img, "compare", src, dst], capture_output=True, text=True)
    assert (q.returncode, q.stdout) == (0, "Images are identical.\n")
    info = json.loads(subprocess.run(run + ["info", "--output=json", dst],
                                     capture_output=True, text=True).stdout)
    qinfo = json.loads(subprocess.run([qemu_img, "info", "--output=json", dst],
                                      capture_output=True, text=True).stdout)
    assert info == qinfo


# -- review mends: one size parser, directories, cache modes ---------------------------------

def _both(tmp_path, capsys, qemu_img, *args):
    """qemu-img and blockdrv run with the same arguments in ``tmp_path``
    (ours writing ``o*`` where qemu writes ``q*``)."""
    q = qemu(qemu_img, *[a.replace("@", "q") for a in args], cwd=tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        o = ours(capsys, *[a.replace("@", "o") for a in args])
    finally:
        os.chdir(cwd)
    return q, o


def _assert_same(q, o, what):
    assert (o[0], o[1].replace("o.raw", "q.raw")) == (q[0], q[1]), what
    same_error(o[2].replace("o.raw", "q.raw"), q[2])


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "@.raw", "0x1k"], ["create", "-f", "raw", "@.raw", "+1k"],
    ["create", "-f", "raw", "@.raw", "1.0005k"], ["create", "-f", "raw", "@.raw", "0x1.8k"],
    ["create", "-f", "raw", "-o", "size=0x10", "@.raw"],
    ["create", "-f", "raw", "-o", "size=+1.0005k", "@.raw"],
    ["create", "-f", "raw", "-o", "size=16E", "@.raw"],
    ["convert", "-S", "16E", "h.raw", "@.raw"], ["convert", "-S", "0x1k", "h.raw", "@.raw"],
    ["map", "--start-offset=0x10", "--max-length=1.0005k", "h.raw"],
])
def test_size_syntax_matches(tmp_path, capsys, qemu_img, args):
    sparse_file(tmp_path / "h.raw", 64 << 10, [(1000, b"data")])
    q, o = _both(tmp_path, capsys, qemu_img, *args)
    _assert_same(q, o, args)
    if (tmp_path / "q.raw").exists() or (tmp_path / "o.raw").exists():
        assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_resize_size_syntax_matches(tmp_path, capsys, qemu_img):
    """resize takes sizes up to 2^64 - 1 (negative as int64_t), hex, '+'."""
    for name in ("q.raw", "o.raw"):
        sparse_file(tmp_path / name, 1 << 20, [])
    for size in ("+0x1k", "+1.0005k", "0x200000", "16E", "+16E", "18446744073709551616",
                 "15.99E", "18446744073709551615", "-0x1k"):
        flags = ["--shrink"] if size.startswith("-") else []
        q, o = _both(tmp_path, capsys, qemu_img, "resize", "-f", "raw", *flags, "@.raw", size)
        _assert_same(q, o, size)
        assert os.path.getsize(tmp_path / "o.raw") == os.path.getsize(tmp_path / "q.raw")


@pytest.mark.parametrize("args", [
    ["info", "d"], ["info", "-f", "raw", "d"], ["check", "d"], ["check", "-r", "all", "d"],
    ["resize", "d", "1M"], ["resize", "-f", "raw", "d", "1M"], ["map", "d"],
    ["compare", "d", "h.raw"], ["bench", "-w", "d"], ["convert", "d", "x.raw"],
    ["convert", "h.raw", "d"], ["create", "-f", "raw", "d", "1M"],
    ["create", "-f", "raw", "nodir/x.raw", "1M"],
])
def test_directory_errors_match(tmp_path, capsys, qemu_img, args):
    """Read-only opens of a directory fail after file-posix's fstat; writable
    ones in open(2); create says "Could not create"."""
    (tmp_path / "d").mkdir()
    sparse_file(tmp_path / "h.raw", 64 << 10, [])
    q, o = _both(tmp_path, capsys, qemu_img, *args)
    _assert_same(q, o, args)


@pytest.mark.parametrize("flags", [["-r"], [], ["-f", "raw"]])
def test_io_directory_errors_match(tmp_path, qemu_io, flags):
    (tmp_path / "d").mkdir()
    argv = [*flags, "-c", "read 0 1", "d"]
    q = subprocess.run([qemu_io, *argv], capture_output=True, text=True, cwd=tmp_path)
    o = subprocess.run([sys.executable, "-m", "blockdrv", "io", *argv],
                       capture_output=True, text=True, cwd=tmp_path)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace("blockdrv:", "qemu-io:") == q.stderr


@pytest.mark.parametrize("args", [
    ["convert", "-t", "off", "h.raw", "@.raw"], ["convert", "-t", "bogus", "h.raw", "@.raw"],
    ["convert", "-T", "off", "h.raw", "@.raw"], ["convert", "-T", "bogus", "h.raw", "@.raw"],
    ["bench", "-t", "bogus", "-c", "1", "h.raw"],
])
def test_cache_modes_match(tmp_path, capsys, qemu_img, args):
    """bdrv_parse_cache_mode: 'off' is 'none'; each command's own error."""
    sparse_file(tmp_path / "h.raw", 64 << 10, [(1000, b"data")])
    q, o = _both(tmp_path, capsys, qemu_img, *args)
    _assert_same(q, o, args)
    if q[0] == 0:
        assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_bench_cache_off_is_none(tmp_path, capsys, qemu_img):
    """qemu-img bench takes -t off as -t none (O_DIRECT); so does blockdrv bench."""
    path = sparse_file(tmp_path / "h.raw", 64 << 10, [])
    for mode in ("off", "none"):
        assert qemu(qemu_img, "bench", "-t", mode, "-c", "1", "-q", path)[0] == 0
        code, _, err = ours(capsys, "bench", "-t", mode, "-c", "1", "-q", path)
        assert (code, err) == (0, "")


@pytest.mark.parametrize("cmd", ["read 0x1k 1", "read +1 1.0005k", "truncate -m bogus 1M"])
def test_io_cache_off_and_sizes_match(tmp_path, qemu_io, cmd):
    from blockdrv.cli.io import normalize_qemu_io_output
    argv = ["-f", "raw", "-t", "off", "-c", cmd, "h.raw"]
    res = []
    for tool in ([qemu_io], [sys.executable, "-m", "blockdrv", "io"]):
        sparse_file(tmp_path / "h.raw", 64 << 10, [])
        r = subprocess.run([*tool, *argv], capture_output=True, text=True, cwd=tmp_path)
        res.append((r.returncode, normalize_qemu_io_output(r.stdout),
                    normalize_qemu_io_output(r.stderr)))
    assert res[1] == res[0]
