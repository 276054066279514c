"""Flags mean what they say: every option the commands accept either works
(and reaches the open, the engine or the node) or is refused with one line.
Messages with an oracle are compared with qemu-img / qemu-io 7.2 (under
CI=true a missing qemu fails, see blockdrv.testing.tools.require_tool)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import pytest

from blockdrv import block
from blockdrv.cli import convert as convert_mod
from blockdrv.cli import main
from blockdrv.engines import convert as convert_engine
from blockdrv.cli.io import run as io_run
from blockdrv.errors import InvalidArgumentError
from blockdrv.common import O_FORCE_SHARE, O_NOCACHE, O_NO_FLUSH, O_RDWR, O_UNMAP
from blockdrv.node import BlockDriverState
from blockdrv.testing.qemu import QEMU_IMG, QEMU_IO
from blockdrv.testing.tools import require_tool

MiB = 1 << 20


@pytest.fixture(scope="module")
def qimg() -> str:
    return require_tool(QEMU_IMG)


@pytest.fixture(scope="module")
def qio() -> str:
    return require_tool(QEMU_IO)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockdrv: "), err
    assert "Traceback" not in err
    return lines[0][len("blockdrv: "):]


def qemu_error(argv, cwd) -> tuple[int, str]:
    """rc and the first stderr line of a qemu tool, without its prefix."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd)
    first = proc.stderr.splitlines()[0] if proc.stderr else ""
    return proc.returncode, first.split(": ", 1)[1] if ": " in first else first


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_data_raw(path, size=16 * MiB) -> None:
    """A raw image with distinct data in every 2 MiB piece and a hole."""
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(bytes([i + 1]) * (MiB if i % 4 != 3 else 0))
            if i % 4 == 3:
                f.seek(MiB, os.SEEK_CUR)
        f.truncate(size)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.raw"
    make_data_raw(path)
    return path


# -- A. never write over a source ------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dot", "absolute", "symlink", "hardlink"])
@pytest.mark.parametrize("extra", [[], ["-n"], ["-m", "4"]])
def test_convert_refuses_target_that_is_a_source(tmp_path, capsys, monkeypatch, src,
                                                 spelling, extra):
    monkeypatch.chdir(tmp_path)
    before, stat = digest(src), os.stat(src)
    target = {"same": "src.raw", "dot": "./src.raw", "absolute": str(src),
              "symlink": "link.raw", "hardlink": "hard.raw"}[spelling]
    if spelling == "symlink":
        os.symlink("src.raw", "link.raw")
    if spelling == "hardlink":
        os.link("src.raw", "hard.raw")
    code, out, err = run(capsys, "convert", *extra, "-f", "raw", "-O", "raw", "src.raw",
                         target)
    assert code == 1 and out == ""
    assert one_error(err) == (f"Target '{target}' is the same file as source 'src.raw'; "
                              "refusing to overwrite an input image")
    assert digest(src) == before
    assert os.stat(src).st_mtime_ns == stat.st_mtime_ns


def test_convert_refuses_any_of_several_sources(tmp_path, capsys, src):
    other = tmp_path / "other.raw"
    make_data_raw(other, 2 * MiB)
    before = digest(other)
    code, _, err = run(capsys, "convert", "-O", "vhdx", "-f", "raw", src, other, other)
    assert code == 1 and "same file as source" in one_error(err)
    assert digest(other) == before


def test_convert_refuses_backing_file_of_source(tmp_path, capsys):
    parent, child = tmp_path / "p.vhdx", tmp_path / "c.vhdx"
    assert main(["create", "-q", "-f", "vhdx", str(parent), "4M"]) == 0
    assert main(["io", "-f", "vhdx", "-c", "write -P 7 0 1M", str(parent)]) == 0
    assert main(["create", "-q", "-f", "vhdx", "-b", "p.vhdx", "-F", "vhdx", str(child)]) == 0
    capsys.readouterr()
    before = digest(parent)
    code, _, err = run(capsys, "convert", "-O", "vhdx", child, parent)
    assert code == 1
    assert "same file as backing file" in one_error(err)
    assert digest(parent) == before


def test_qemu_img_also_refuses_converting_onto_its_source(tmp_path, qimg, src):
    """The oracle: qemu-img fails there too (through its write lock)."""
    before = digest(src)
    rc, message = qemu_error([qimg, "convert", "-f", "raw", "-O", "raw", "src.raw",
                              "./src.raw"], tmp_path)
    assert rc == 1 and "lock" in message
    assert digest(src) == before


def test_check_target_not_source_helper(tmp_path, src):
    fresh = tmp_path / "new.raw"
    block.check_target_not_source(str(fresh), [str(src)])      # does not exist yet
    with pytest.raises(InvalidArgumentError, match="same file as source"):
        block.check_target_not_source(str(src), [str(tmp_path / "x"), str(src)])
    bs = block.open_node(str(src), "raw")
    try:
        renamed = tmp_path / "renamed.raw"
        os.rename(src, renamed)        # the open node is known by its descriptor
        with pytest.raises(InvalidArgumentError):
            block.check_target_not_source(str(renamed), [bs])
    finally:
        bs.close()
    block.check_target_not_source("memory:a", ["memory:b"])
    with pytest.raises(InvalidArgumentError):
        block.check_target_not_source("memory:a", ["memory:a"])


# -- B. convert -m / -W / -T / -t / -U ---------------------------------------------

@pytest.mark.parametrize("value", ["0", "17", "x", "0x11", "021", "4 ", "-0", "1e1"])
def test_convert_m_range_is_qemus(tmp_path, capsys, qimg, src, value):
    code, _, err = run(capsys, "convert", "-m", value, "-O", "raw", src, tmp_path / "o")
    rc, message = qemu_error([qimg, "convert", "-m", value, "-O", "raw", src,
                              tmp_path / "q"], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message == ("Invalid number of coroutines. Allowed number "
                                         "of coroutines is between 1 and 16")
    assert not (tmp_path / "o").exists()


class Recorder(convert_engine.ImgConvertState):
    """A Converter whose first extents take longest to scan (so that, when
    allowed, later ones are written first) and that records the order of
    its writes."""

    last: "Recorder | None" = None
    expect = 1                  # requests that must be in flight together

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.writes: list[int] = []
        # the first requests wait for each other, whatever the host's load:
        # with -m N, N of them must be between read and write at once
        self.barrier = threading.Barrier(Recorder.expect)
        self.arrived = 0
        self.count_lock = threading.Lock()
        Recorder.last = self

    def copy_parallel(self, *a, **k):
        self.parallel = True
        super().copy_parallel(*a, **k)

    def _rendezvous(self) -> None:
        with self.count_lock:
            self.arrived += 1
            first_round = self.arrived <= Recorder.expect
        if first_round:
            self.barrier.wait(timeout=60)

    def plan_data(self, dst, buf, nbytes):
        if getattr(self, "parallel", False):
            self._rendezvous()
            # later extents plan faster: with -W they may be written first
            time.sleep(0.005 * (16 - (dst // (2 * MiB)) % 16))
        return super().plan_data(dst, buf, nbytes)

    def plan_zeroes(self, dst, nbytes):
        if getattr(self, "parallel", False):
            self._rendezvous()
        return super().plan_zeroes(dst, nbytes)

    def execute(self, plan):
        self.writes.extend(offset for _, offset, _ in plan)
        super().execute(plan)


@pytest.mark.parametrize("args, in_flight, ordered", [
    ([], 1, True), (["-m", "1"], 1, True), (["-m", "4"], 4, True),
    (["-m", "16"], 12, True), (["-m", "4", "-W"], 4, False)])
def test_convert_m_runs_n_requests_and_w_allows_out_of_order(
        tmp_path, capsys, monkeypatch, src, args, in_flight, ordered):
    monkeypatch.setattr(convert_engine, "ImgConvertState", Recorder)
    monkeypatch.setattr(Recorder, "expect", in_flight)
    out = tmp_path / "o.vhdx"
    code, _, err = run(capsys, "convert", *args, "-f", "raw", "-O", "vhdx", src, out)
    assert code == 0, err
    conv = Recorder.last
    assert conv.max_in_flight == in_flight       # src: 12 extents of <= 2 MiB
    assert (conv.writes == sorted(conv.writes)) is ordered
    assert run(capsys, "compare", "-f", "raw", "-F", "vhdx", src, out)[0] == 0


@pytest.mark.parametrize("value, count", [("0x10", 16), ("020", 16), (" 3", 3), ("+2", 2)])
def test_convert_m_number_syntax_is_strtol_base_0(tmp_path, capsys, qimg, src, value,
                                                  count):
    assert qemu_error([qimg, "convert", "-m", value, "-O", "raw", src, tmp_path / "q"],
                      tmp_path)[0] == 0
    assert convert_mod.coroutine_count(value) == count


def test_convert_m_error_mid_copy_is_one_line(tmp_path, capsys, monkeypatch, src):
    def failing(self, plan):
        from blockdrv.errors import BlockIOError
        raise self._write_error(plan[0][1], BlockIOError("Input/output error"))
    monkeypatch.setattr(convert_engine.ImgConvertState, "execute", failing)
    out = tmp_path / "o.raw"
    code, _, err = run(capsys, "convert", "-m", "8", "-O", "raw", src, out)
    assert code == 1 and one_error(err).startswith("error while writing at byte")
    assert not out.exists()


@pytest.fixture
def opens(monkeypatch):
    """Every node the CLI opens (through common.open_image or block.open_node)."""
    seen: list[BlockDriverState] = []
    real = block.open_node

    def spy(*a, **k):
        bs = real(*a, **k)
        seen.append(bs)
        return bs
    monkeypatch.setattr(block, "open_node", spy)
    monkeypatch.setattr("blockdrv.cli.common.open_node", spy)
    return seen


def test_convert_cache_modes_reach_the_opens(tmp_path, capsys, monkeypatch, opens, src):
    code, _, err = run(capsys, "convert", "-T", "none", "-t", "unsafe", "-U", "-O", "raw",
                       src, tmp_path / "o.raw")
    assert code == 0, err
    source, target = opens[0], opens[-1]
    assert source.open_flags & O_NOCACHE and source.open_flags & O_FORCE_SHARE
    assert target.open_flags & O_NO_FLUSH and target.open_flags & O_RDWR
    assert not target.open_flags & O_FORCE_SHARE          # -U is for the sources
    code, _, err = run(capsys, "convert", "-T", "bogus", "-O", "raw", src, tmp_path / "p")
    assert code == 1 and one_error(err) == "Invalid source cache option: bogus"


@pytest.mark.parametrize("engine", [[], ["-m", "4"]])
def test_convert_t_writethrough_flushes_every_write(tmp_path, capsys, monkeypatch, src,
                                                    engine):
    flushes = []
    real_flush, real_co_flush = BlockDriverState.flush, BlockDriverState.co_flush
    monkeypatch.setattr(BlockDriverState, "flush",
                        lambda self: (flushes.append(1), real_flush(self))[1])

    async def co_flush(self):
        flushes.append(1)
        await real_co_flush(self)
    monkeypatch.setattr(BlockDriverState, "co_flush", co_flush)
    for mode, many in (("writethrough", True), ("writeback", False)):
        flushes.clear()
        code, _, err = run(capsys, "convert", *engine, "-t", mode, "-O", "raw", src,
                           tmp_path / f"{mode}.raw")
        assert code == 0, err
        assert (len(flushes) > 8) is many, len(flushes)


# -- -U reaches every read-only open; writable opens refuse it as qemu does -------

@pytest.fixture
def vhdx(tmp_path):
    path = tmp_path / "v.vhdx"
    assert main(["create", "-q", "-f", "vhdx", str(path), "4M"]) == 0
    return path


@pytest.mark.parametrize("argv", [
    ["info", "-U"], ["check", "-U"], ["map", "-U"], ["compare", "-U", "{0}"],
    ["bench", "-U", "-c", "4", "-q"], ["convert", "-U", "-O", "raw", "{0}", "{1}"],
    ["io", "-U", "-r", "-c", "read 0 4k"]])
def test_force_share_reaches_the_node(tmp_path, capsys, opens, vhdx, argv):
    args = [a.format(vhdx, tmp_path / "out.raw") for a in argv]
    if args[0] == "convert":
        args = args[:-2] + [str(vhdx), args[-1]]
    else:
        args.append(str(vhdx))
    code, _, err = run(capsys, *args)
    assert code == 0, err
    src_opens = [bs for bs in opens if bs.filename == str(vhdx)]
    assert src_opens and all(bs.open_flags & O_FORCE_SHARE for bs in src_opens)
    assert all(bs.file.open_flags & O_FORCE_SHARE for bs in src_opens)


@pytest.mark.parametrize("argv", [
    ["check", "-r", "all", "-U"], ["bench", "-w", "-U", "-c", "1"]])
def test_force_share_with_a_writable_open_is_qemus_error(tmp_path, capsys, monkeypatch,
                                                         qimg, vhdx, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv, "v.vhdx")
    rc, message = qemu_error([qimg, *argv, "v.vhdx"], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message == ("Could not open 'v.vhdx': force-share=on can "
                                         "only be used with read-only images")


def io(argv):
    import io as _io
    out, err = _io.StringIO(), _io.StringIO()
    code = io_run([str(a) for a in argv], stdout=out, stderr=err, stdin=_io.StringIO())
    return code, out.getvalue(), err.getvalue()


def test_io_force_share_without_r_is_qemus_error(tmp_path, qio, vhdx):
    code, _, err = io(["-U", "-c", "read 0 512", vhdx])
    rc, message = qemu_error([qio, "-U", "-c", "read 0 512", vhdx], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message


# -- io options ----------------------------------------------------------------

@pytest.mark.parametrize("mode, unmap", [("unmap", True), ("on", True), ("off", False),
                                         ("ignore", False)])
def test_io_discard_mode_is_an_open_option(opens, vhdx, mode, unmap):
    code, out, err = io(["-d", mode, "-f", "vhdx", "-c", "discard 0 1M", vhdx])
    assert code == 0, err
    bs = opens[-1]
    assert bs.options["discard"] == mode
    assert bool(bs.open_flags & O_UNMAP) is unmap
    assert bool(bs.file.open_flags & O_UNMAP) is unmap


@pytest.mark.parametrize("argv", [["-d", "bogus"], ["-i", "bogus"]])
def test_io_bad_mode_messages_are_qemus(tmp_path, qio, vhdx, argv):
    code, _, err = io([*argv, "-c", "read 0 512", vhdx])
    rc, message = qemu_error([qio, *argv, "-c", "read 0 512", vhdx], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message


@pytest.mark.parametrize("argv, word", [
    (["-C"], "-C"), (["-m"], "-m"), (["-k"], "-k"), (["-T", "foo"], "-T"),
    (["--copy-on-read"], "-C"), (["--native-aio"], "-k"), (["--trace", "x"], "-T"),
    (["-s"], "-s"), (["-i", "native"], "aio=native"), (["--aio=io_uring"], "aio=io_uring")])
def test_io_unsupported_options_are_refused(vhdx, argv, word):
    code, out, err = io([*argv, "-c", "read 0 512", vhdx])
    assert code == 1 and out == ""
    assert one_error(err).startswith(f"option {word} is not supported"
                                     if word.startswith("-") else f"{word} is not supported")


def test_io_aio_threads_and_cache_flags(opens, vhdx):
    assert io(["-i", "threads", "-c", "read 0 512", vhdx])[0] == 0
    assert io(["-t", "unsafe", "-c", "write 0 512", vhdx])[0] == 0
    assert opens[-1].open_flags & O_NO_FLUSH
    assert io(["-n", "-c", "write 0 512", vhdx])[0] == 0
    assert opens[-1].open_flags & O_NOCACHE


def test_bench_t_unsafe_reaches_the_open(capsys, opens, vhdx):
    code, _, err = run(capsys, "bench", "-w", "-t", "unsafe", "-c", "2", "-q", vhdx)
    assert code == 0, err
    assert opens[-1].open_flags & O_NO_FLUSH


# -- create -u -----------------------------------------------------------------------

def test_create_u_without_size_is_qemus_error(tmp_path, capsys, monkeypatch, qimg):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "create", "-f", "vhdx", "-u", "-b", "missing.vhdx",
                       "-F", "vhdx", "x.vhdx")
    rc, message = qemu_error([qimg, "create", "-f", "qcow2", "-u", "-b", "missing.qcow2",
                              "-F", "qcow2", "x.vhdx"], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message == "x.vhdx: Image creation needs a size parameter"
    assert not (tmp_path / "x.vhdx").exists()


@pytest.mark.parametrize("parent", ["p.vhdx", "missing.vhdx"])
def test_create_u_with_vhdx_backing_is_refused(tmp_path, capsys, parent):
    assert main(["create", "-q", "-f", "vhdx", str(tmp_path / "p.vhdx"), "1M"]) == 0
    capsys.readouterr()
    child = tmp_path / "c.vhdx"
    code, out, err = run(capsys, "create", "-f", "vhdx", "-u", "-b", parent, "-F", "vhdx",
                         child, "1M")
    assert code == 1 and out == ""
    assert "-u (do not open the backing file) is not supported for vhdx" in one_error(err)
    assert not child.exists()


def test_create_u_without_backing_works(tmp_path, capsys):
    code, _, err = run(capsys, "create", "-q", "-u", "-f", "vhdx", tmp_path / "x.vhdx", "1M")
    assert code == 0, err


# -- resize --preallocation ------------------------------------------------------

def test_resize_preallocation_metadata_on_raw_is_qemus_error(tmp_path, capsys, qimg):
    ours, theirs = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (ours, theirs):
        assert main(["create", "-q", "-f", "raw", str(p), "1M"]) == 0
    code, _, err = run(capsys, "resize", "--preallocation=metadata", "-f", "raw", ours, "2M")
    rc, message = qemu_error([qimg, "resize", "--preallocation=metadata", "-f", "raw",
                              theirs, "2M"], tmp_path)
    assert code == rc == 1
    assert one_error(err) == message == "Unsupported preallocation mode: metadata"
    assert os.path.getsize(ours) == MiB


# -- bench: the request-shaping flags write what qemu-img bench writes ---------

@pytest.mark.parametrize("flags", [
    ["-c", "5", "-d", "2", "-s", "4k", "-S", "12k", "-o", "64k", "--pattern=0xab"],
    ["-c", "8", "-d", "2", "-s", "512", "--pattern=7", "--flush-interval=4", "--no-drain"],
    ["-c", "6", "-d", "1", "-s", "64k", "-S", "200k", "-o", "900k", "--pattern=1",
     "--flush-interval=2"]])
def test_bench_writes_like_qemu_img_bench(tmp_path, capsys, qimg, flags):
    ours, theirs = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (ours, theirs):
        assert main(["create", "-q", "-f", "raw", str(p), "1M"]) == 0
    code, _, err = run(capsys, "bench", "-w", "-q", "-f", "raw", *flags, ours)
    assert code == 0, err
    assert qemu_error([qimg, "bench", "-w", "-q", "-f", "raw", *flags, theirs],
                      tmp_path)[0] == 0
    assert digest(ours) == digest(theirs)
    with open(ours, "rb") as f:
        assert f.read().count(0) < MiB            # something was written
