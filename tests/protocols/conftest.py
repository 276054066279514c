"""Fixtures for the remote protocols: NBD servers (qemu-nbd, nbdkit and
``blockdrv nbd``) on unix sockets (or a loopback TCP port) in a temporary
directory, killed by pid at teardown, and images with known content.  Nothing
here reaches the network."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from blockdrv.testing.tools import require_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
IMAGE_SIZE = 48 * MiB
# (offset, length, pattern): data in the first, a middle and a late block
WRITES = [(0, 64 * 1024, 0x5A), (9 * MiB + 4096, 700 * 1024, 0xC3), (40 * MiB, 2 * MiB, 0x11)]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: list[str], check: bool = True, timeout: float = 120):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def blockdrv(*args: str, check: bool = True):
    return run([sys.executable, "-m", "blockdrv", *args], check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """{"vhdx": path, "raw": path}: a dynamic VHDX written by qemu-io and the
    sparse raw qemu-img converts it to."""
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    d = tmp_path_factory.mktemp("remote-images")
    vhdx, raw = str(d / "disk.vhdx"), str(d / "disk.raw")
    run([qemu_img, "create", "-q", "-f", "vhdx", "-o", "block_size=8M", vhdx, str(IMAGE_SIZE)])
    cmds = []
    for off, n, pat in WRITES:
        cmds += ["-c", f"write -q -P {pat:#x} {off} {n}"]
    run([qemu_io, "-f", "vhdx", *cmds, vhdx])
    run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", "-S", "4k", vhdx, raw])
    return {"vhdx": vhdx, "raw": raw}


class Servers:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.pids: list[str] = []
        self.count = 0

    def _wait(self, pidfile: str, sock: str | None, port: int | None, proc) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = os.path.exists(sock) if sock else _listening(port)
            if os.path.exists(pidfile) and os.path.getsize(pidfile) and ready:
                return
            if proc is not None and proc.poll() not in (None, 0):
                raise AssertionError(f"server failed: {proc.stderr.read()}")
            time.sleep(0.02)
        raise AssertionError("server did not come up")

    def start(self, kind: str, image: str | None = None, fmt: str = "raw",
              readonly: bool = True, name: str = "", tcp: bool = False,
              extra: tuple = ()) -> str:
        """Start ``kind`` (qemu-nbd, nbdkit, nbdkit-memory, blockdrv) serving
        ``image``; returns the URI."""
        self.count += 1
        sock = None if tcp else str(self.tmp / f"{kind}-{self.count}.sock")
        port = free_port() if tcp else None
        pidfile = str(self.tmp / f"{kind}-{self.count}.pid")
        if kind == "qemu-nbd":
            cmd = [require_tool("qemu-nbd"), "-f", fmt, "--fork", "--pid-file", pidfile,
                   "-t", "--cache=writeback"]
            cmd += ["-k", sock] if sock else ["-b", "127.0.0.1", "-p", str(port)]
            cmd += (["-r"] if readonly else []) + (["-x", name] if name else [])
            cmd += [*extra, image]
        elif kind.startswith("nbdkit"):
            cmd = [require_tool("nbdkit"), "-P", pidfile]
            cmd += ["-U", sock] if sock else ["-i", "127.0.0.1", "-p", str(port)]
            cmd += (["-r"] if readonly else []) + (["-e", name] if name else [])
            cmd += [*extra]
            cmd += ["memory", image] if kind == "nbdkit-memory" else ["file", image]
        elif kind == "blockdrv":
            cmd = [sys.executable, "-m", "blockdrv", "nbd", "-f", fmt, "-t", "--fork",
                   "--pid-file", pidfile, "-e", "0"]
            cmd += ["-k", sock] if sock else ["-b", "127.0.0.1", "-p", str(port)]
            cmd += (["-r"] if readonly else []) + (["-x", name] if name else [])
            cmd += [*extra, image]
        else:
            raise ValueError(kind)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env())
        self._wait(pidfile, sock, port, proc)
        proc.wait(10)
        self.pids.append(pidfile)
        if sock:
            return f"nbd+unix:///{name}?socket={sock}"
        return f"nbd://127.0.0.1:{port}/{name}"

    def stop(self) -> None:
        for pidfile in self.pids:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.stop()
