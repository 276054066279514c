"""Image locking across real processes: blockdrv and qemu exclude each other.

A *holder* process keeps an image open (an interactive ``blockdrv io`` or
``qemu-io`` session, or a Python program using the API) while a *contender*
process tries to open it.  Every blockdrv contender is run beside its qemu
twin against the same holder: both must succeed or both must fail, with the
same lock named.  The matrix below also states the outcomes on its own, so a
symmetric bug (both tools wrong in the same way) cannot hide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import blockdrv
from blockdrv.errors import PermissionConflictError
from blockdrv.testing.qemu import qemu_img_create

pytestmark = pytest.mark.interop

SIZE = 16 << 20
BLOCKDRV = [sys.executable, "-m", "blockdrv"]
BLOCKDRV_IO = [sys.executable, "-m", "blockdrv.cli.io"]


class Holder:
    """An interactive session that keeps ``path`` open until closed."""

    def __init__(self, argv: list[str], ready_cmd: str = "read 0 512", lines: int = 2) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        # A command's answer proves the image is open (and locked).
        out = self.command(ready_cmd, lines)
        if "bytes at offset" not in out and "ready" not in out:
            rest = self.proc.communicate(timeout=10)[0]
            raise AssertionError(f"holder {argv} failed: {out}{rest}")

    def command(self, cmd: str, lines: int = 2) -> str:
        """Send one command and read its ``lines`` lines of answer (qemu-io's
        read/write print a result and a statistics line)."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return "".join(self.proc.stdout.readline() for _ in range(lines))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=20)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)


def _holder_argv(kind: str, tool: str, path: str, qemu_io: str) -> list[str]:
    base = BLOCKDRV_IO if tool == "blockdrv" else [qemu_io]
    flags = {"rw": [], "ro": ["-r"], "ro-U": ["-r", "-U"]}[kind]
    return [*base, *flags, path]


# Contenders: (name, blockdrv argv, qemu argv); PATH is replaced by the image.
CONTENDERS = {
    "io write": (BLOCKDRV_IO + ["-c", "write -P 0x5a 0 4k", "PATH"],
                 ["QEMU_IO", "-c", "write -P 0x5a 0 4k", "PATH"]),
    "io -r read": (BLOCKDRV_IO + ["-r", "-c", "read 0 4k", "PATH"],
                   ["QEMU_IO", "-r", "-c", "read 0 4k", "PATH"]),
    "io -r -U read": (BLOCKDRV_IO + ["-r", "-U", "-c", "read 0 4k", "PATH"],
                      ["QEMU_IO", "-r", "-U", "-c", "read 0 4k", "PATH"]),
    "info": (BLOCKDRV + ["info", "PATH"], ["QEMU_IMG", "info", "PATH"]),
    "check": (BLOCKDRV + ["check", "PATH"], ["QEMU_IMG", "check", "PATH"]),
    "map": (BLOCKDRV + ["map", "--output=json", "PATH"],
            ["QEMU_IMG", "map", "--output=json", "PATH"]),
}

# holder kind -> contenders that must be refused (all others must succeed).
REFUSED = {
    "rw": {"io write", "io -r read", "info", "check", "map"},
    "ro": {"io write"},
    "ro-U": set(),
}


def _run(argv: list[str], path: str, qemu_img: str, qemu_io: str):
    argv = [{"PATH": path, "QEMU_IMG": qemu_img, "QEMU_IO": qemu_io}.get(a, a) for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _lock_named(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if "lock" in line and "Failed to get" in line:
            return line[line.index("Failed to get"):].split(" lock")[0]
    return None


@pytest.fixture
def image(tmp_path, qemu_img):
    path = str(tmp_path / "disk.vhdx")
    qemu_img_create(path, "vhdx", SIZE)
    return path


@pytest.mark.parametrize("holder_tool", ["blockdrv", "qemu"])
@pytest.mark.parametrize("kind", ["rw", "ro", "ro-U"])
def test_lock_matrix(image, qemu_img, qemu_io, holder_tool, kind):
    holder = Holder(_holder_argv(kind, holder_tool, image, qemu_io))
    try:
        for name, (ours, theirs) in CONTENDERS.items():
            a = _run(ours, image, qemu_img, qemu_io)
            b = _run(theirs, image, qemu_img, qemu_io)
            refused = name in REFUSED[kind]
            where = f"{holder_tool} holder ({kind}), contender {name!r}"
            assert (b.returncode != 0) == refused, f"qemu: {where}: {b.stderr}"
            assert (a.returncode != 0) == refused, f"blockdrv: {where}: {a.stderr}"
            if refused:
                assert _lock_named(a.stderr) == _lock_named(b.stderr), where
                assert f"Is another process using the image [{image}]?" in a.stderr, where
                assert "Traceback" not in a.stderr
    finally:
        holder.close()
    # Released on close: a writer gets in now.
    assert _run(CONTENDERS["io write"][0], image, qemu_img, qemu_io).returncode == 0


def test_writers_exclude_each_other_and_nothing_flushed_is_lost(image, qemu_img):
    """The first writer's acknowledged writes survive a second writer's attempt."""
    holder = Holder(BLOCKDRV_IO + [image])
    try:
        assert "wrote 65536/65536 bytes" in holder.command("write -P 0x11 0 64k")
        holder.command("flush", lines=0)
        other = subprocess.run(BLOCKDRV_IO + ["-c", "write -P 0x22 0 64k", image],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0
        assert 'Failed to get "write" lock' in other.stderr
    finally:
        holder.close()
    check = subprocess.run([qemu_img, "check", image], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with blockdrv.open_image(image) as img:
        assert img.read(0, 64 << 10) == b"\x11" * (64 << 10)


def test_lock_released_when_holder_dies(image, qemu_img, qemu_io):
    holder = Holder(BLOCKDRV_IO + [image])
    blocked = _run(CONTENDERS["io write"][1], image, qemu_img, qemu_io)
    assert blocked.returncode != 0
    holder.kill()
    free = _run(CONTENDERS["io write"][1], image, qemu_img, qemu_io)
    assert free.returncode == 0, free.stderr


_API_HOLDER = textwrap.dedent("""
    import sys, blockdrv
    img = blockdrv.open_image(sys.argv[1], readonly=sys.argv[2] == "ro")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rw":
            img.bs.reopen(read_only=False)
        elif cmd == "ro":
            img.bs.reopen(read_only=True)
        elif cmd == "quit":
            break
        print("ready " + cmd, flush=True)
    img.close()
""")


def test_reopen_moves_the_locks(image, qemu_img, qemu_io):
    holder = Holder([sys.executable, "-c", _API_HOLDER, image, "ro"], ready_cmd="noop",
                    lines=1)
    try:
        reader = CONTENDERS["io -r read"][1]
        writer = CONTENDERS["io write"][1]
        assert _run(reader, image, qemu_img, qemu_io).returncode == 0
        assert _run(writer, image, qemu_img, qemu_io).returncode != 0
        assert holder.command("rw", lines=1).startswith("ready rw")
        # Now a writer: qemu's readers are refused too.
        r = _run(reader, image, qemu_img, qemu_io)
        assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr
        assert holder.command("ro", lines=1).startswith("ready ro")
        assert _run(reader, image, qemu_img, qemu_io).returncode == 0
        assert _run(writer, image, qemu_img, qemu_io).returncode != 0
    finally:
        holder.close()


def test_reopen_read_write_refused_while_another_reader_holds(image, qemu_io):
    reader = Holder([qemu_io, "-r", image])
    try:
        with blockdrv.open_image(image) as img:
            with pytest.raises(PermissionConflictError, match='Failed to get "write" lock'):
                img.bs.reopen(read_only=False)
            # Refused as a whole: still read-only, still readable.
            assert img.readonly
            img.read(0, 4096)
    finally:
        reader.close()


def test_api_opens_conflict_in_one_process(image):
    with blockdrv.open_image(image, readonly=False):
        with pytest.raises(PermissionConflictError, match="Is another process using"):
            blockdrv.open_image(image)
        with blockdrv.open_image(image, force_share=True) as shared:
            assert shared.size == SIZE
        with pytest.raises(blockdrv.InvalidArgumentError, match="read-only"):
            blockdrv.open_image(image, readonly=False, force_share=True)


def test_create_over_a_held_image_changes_nothing(image, qemu_io):
    before = open(image, "rb").read()
    holder = Holder([qemu_io, "-r", image])
    try:
        r = subprocess.run(BLOCKDRV + ["create", "-f", "vhdx", image, "1M"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stderr
    finally:
        holder.close()
    assert open(image, "rb").read() == before


def test_raw_locks_as_qemu_does(tmp_path, qemu_img, qemu_io):
    """raw passes its user's permissions through (QEMU's raw is a filter):
    two raw writers are *not* excluded by qemu either, a metadata format's
    holder is what keeps them out.  Same outcome on both tools."""
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    holder = Holder([qemu_io, "-f", "raw", path])
    try:
        ours = subprocess.run(BLOCKDRV_IO + ["-f", "raw", "-c", "write 0 512", path],
                              capture_output=True, text=True, timeout=60)
        theirs = subprocess.run([qemu_io, "-f", "raw", "-c", "write 0 512", path],
                                capture_output=True, text=True, timeout=60)
        assert (ours.returncode == 0) == (theirs.returncode == 0)
    finally:
        holder.close()


def _lock_ranges(path: str) -> list[tuple[int, int]]:
    """The OFD lock byte ranges held on ``path``, from /proc/locks."""
    ino = os.stat(path).st_ino
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                continue                        # a waiter, not a holder
            if fields[1] == "OFDLCK" and int(fields[5].rsplit(":", 1)[1]) == ino:
                out.append((int(fields[6]), int(fields[7])))
    return sorted(out)


@pytest.mark.parametrize("fmt", ["vhdx", "raw"])
@pytest.mark.parametrize("kind", ["rw", "ro", "ro-U"])
def test_same_lock_bytes_as_qemu(tmp_path, qemu_img, qemu_io, fmt, kind):
    """The bytes blockdrv locks are the ones qemu-io locks for the same open."""
    path = str(tmp_path / f"disk.{fmt}")
    qemu_img_create(path, fmt, SIZE)
    held = {}
    for tool in ("qemu", "blockdrv"):
        argv = _holder_argv(kind, tool, path, qemu_io)
        holder = Holder([*argv[:-1], "-f", fmt, path])
        try:
            held[tool] = _lock_ranges(path)
        finally:
            holder.close()
    assert held["qemu"], "qemu-io took no lock: /proc/locks unreadable?"
    assert held["blockdrv"] == held["qemu"]


def test_info_locks_metadata_only(image):
    """``info`` (O_NO_IO) takes no "consistent read", as qemu-img info."""
    from blockdrv.block import open_node
    from blockdrv.common import O_NO_BACKING, O_NO_IO
    bs = open_node(image, None, O_NO_BACKING | O_NO_IO)
    try:
        assert _lock_ranges(image) == [(201, 201), (203, 203)]
    finally:
        bs.close()
    assert _lock_ranges(image) == []


def test_force_share_reaches_a_differencing_parent(tmp_path, qemu_io):
    parent = str(tmp_path / "parent.vhdx")
    child = str(tmp_path / "child.vhdx")
    blockdrv.create_image(parent, "vhdx", SIZE).close()
    blockdrv.create_image(child, "vhdx", backing_file=parent, backing_fmt="vhdx").close()
    writer = Holder([qemu_io, "-f", "raw", parent])     # any writer of the parent file
    try:
        with pytest.raises(PermissionConflictError, match='shared "write" lock'):
            blockdrv.open_image(child)
        with blockdrv.open_image(child, force_share=True) as img:
            assert img.read(0, 512) == bytes(512)
    finally:
        writer.close()
