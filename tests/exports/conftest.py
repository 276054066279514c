"""Fixtures for the NBD export tests: images with known content and a
``blockdrv nbd`` server on a unix socket in a temporary directory, always
stopped (SIGTERM, then SIGKILL) at the end of the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import blockdrv.testing.plugin as _plugin
from blockdrv.testing.tools import require_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "blockdrv-testing")


def bd_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def blockdrv_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockdrv", *args]


class Server:
    """A running ``blockdrv nbd``."""

    def __init__(self, tmp, image: str, args: list[str], name: str = "",
                 wait: bool = True) -> None:
        self.sock = str(tmp / f"nbd-{os.getpid()}-{id(self)}.sock")
        self.name = name
        self.image = image
        self.log = tmp / f"server-{id(self)}.log"
        self._logf = open(self.log, "wb")
        cmd = blockdrv_cmd("nbd", "-v", "-k", self.sock, *args, image)
        if name:
            cmd[4:4] = ["-x", name]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._logf,
                                     env=bd_env())
        if wait:
            self.wait_ready()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            # the socket file appears at bind(), before listen()
            if os.path.exists(self.sock) and self._accepts():
                return
            time.sleep(0.02)
        raise AssertionError(f"server not listening after {timeout}s: {self.stderr()}")

    def _accepts(self) -> bool:
        # listening (__SO_ACCEPTCON in /proc/net/unix's flags), without
        # connecting: a probe connection would count as a client
        with open("/proc/net/unix") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == self.sock:
                    return bool(int(fields[3], 16) & 0x10000)
        return False

    def stderr(self) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server ignored signal {sig}: {self.stderr()}")
        self._logf.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._logf.closed:
            self._logf.close()


@pytest.fixture
def nbd_server(tmp_path):
    """``nbd_server(image, *args, name="")`` starts a server; each is stopped
    with SIGTERM at teardown and must exit 0 leaving no socket file."""
    servers: list[Server] = []

    def start(image, *args, name: str = "", wait: bool = True) -> Server:
        srv = Server(tmp_path, str(image), list(args), name, wait)
        servers.append(srv)
        return srv

    yield start
    failures = []
    for srv in servers:
        try:
            if srv.proc.poll() is None:
                rc = srv.stop()
                if rc != 0:
                    failures.append(f"server exited {rc}: {srv.stderr()}")
            if os.path.exists(srv.sock):
                failures.append(f"socket {srv.sock} left behind")
        finally:
            srv.kill()
    assert not failures, failures


def run(cmd: list[str], check: bool = True, timeout: float = 60, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=bd_env(), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


# -- images with known content ------------------------------------------------------------

PATTERN_WRITES = [(0, 1 * MiB, 0x5A), (5 * MiB + 4096, 700 * 1024, 0xC3),
                  (20 * MiB, 2 * MiB, 0x11)]
IMAGE_SIZE = 32 * MiB


def fill_pattern(path, fmt: str) -> None:
    """The reference writes, through qemu-io (the oracle writes them)."""
    qemu_io = require_tool("qemu-io")
    cmds = []
    for off, n, pat in PATTERN_WRITES:
        cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
    run([qemu_io, "-f", fmt, *cmds, str(path)])


def reference(tmp_path, writes=PATTERN_WRITES, size: int = IMAGE_SIZE):
    """A raw file holding what the image should read as."""
    ref = tmp_path / "reference.raw"
    with open(ref, "wb") as f:
        f.truncate(size)
        for off, n, pat in writes:
            f.seek(off)
            f.write(bytes([pat]) * n)
    return ref


def make_image(tmp_path, kind: str):
    """(image path, format) for ``kind``: raw, dynamic, fixed, 4k, diff
    (a VHDX child whose parent holds the first pattern write, the child the
    others -- so reads need the chain)."""
    qemu_img = require_tool("qemu-img")
    if kind == "raw":
        path = tmp_path / "disk.raw"
        run([qemu_img, "create", "-q", "-f", "raw", str(path), str(IMAGE_SIZE)])
        fill_pattern(path, "raw")
        return path, "raw"
    if kind == "diff":
        import blockdrv
        parent = tmp_path / "parent.vhdx"
        child = tmp_path / "child.vhdx"
        run([qemu_img, "create", "-q", "-f", "vhdx", str(parent), str(IMAGE_SIZE)])
        qemu_io = require_tool("qemu-io")
        off, n, pat = PATTERN_WRITES[0]
        run([qemu_io, "-f", "vhdx", "-c", f"write -P {pat:#x} {off} {n}", str(parent)])
        blockdrv.create_image(child, "vhdx", backing_file=parent, backing_fmt="vhdx").close()
        with blockdrv.open_image(child, "vhdx", readonly=False) as img:
            for off, n, pat in PATTERN_WRITES[1:]:
                img.write(off, bytes([pat]) * n)
        return child, "vhdx"
    path = tmp_path / f"disk-{kind}.vhdx"
    if kind == "4k":
        # qemu 7.2 neither creates nor opens 4K-sector VHDX: blockdrv makes
        # and fills it (the reads through the export are still checked
        # against the raw reference).
        import blockdrv
        with blockdrv.create_image(path, "vhdx", IMAGE_SIZE, logical_sector_size=4096) as img:
            for off, n, pat in PATTERN_WRITES:
                img.write(off, bytes([pat]) * n)
        return path, "vhdx"
    opts = {"dynamic": [], "fixed": ["-o", "subformat=fixed"]}[kind]
    run([qemu_img, "create", "-q", "-f", "vhdx", *opts, str(path), str(IMAGE_SIZE)])
    fill_pattern(path, "vhdx")
    return path, "vhdx"


def qemu_opens(path) -> bool:
    qemu_img = require_tool("qemu-img")
    return run([qemu_img, "info", str(path)], check=False).returncode == 0


def assert_clean(path, fmt: str) -> None:
    """``blockdrv check`` and (where qemu opens it) ``qemu-img check`` pass."""
    if fmt == "raw":
        return                      # raw has nothing to check
    res = run(blockdrv_cmd("check", "-f", fmt, str(path)), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    if qemu_opens(path):
        qemu_img = require_tool("qemu-img")
        res = run([qemu_img, "check", "-f", fmt, str(path)], check=False)
        assert res.returncode == 0, res.stdout + res.stderr
