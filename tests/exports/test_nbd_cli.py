"""``blockdrv nbd``'s flags: each works as qemu-nbd documents it or is refused
in one line; signals close the image cleanly; TLS with x509 certificates."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from blockdrv.exports.nbd import protocol as P
from blockdrv.testing.tools import require_tool

from .conftest import (IMAGE_SIZE, MiB, assert_clean, bd_env, blockdrv_cmd, make_image,
                       reference, run)
from .nbdclient import Client

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("args, message", [
    (["-c", "/dev/nbd0"], "option '--connect' is not supported"),
    (["-s"], "option '--snapshot' is not supported"),
    (["--image-opts"], "option '--image-opts' is not supported"),
    (["-o", "512"], "option '--offset' is not supported"),
    (["-U"], "-U (force-share) can only be used with read-only exports"),
    (["--detect-zeroes=unmap"], "not allowed without setting discard operation to unmap"),
    (["--detect-zeroes=bogus"], "Failed to parse detect_zeroes mode"),
    (["--cache=bogus"], "Invalid cache mode"),
    (["--discard=bogus"], "Invalid discard mode"),
    (["-e", "-1"], "Invalid shared device number '-1'"),
    (["-k", "/tmp/x.sock", "-p", "10809"], "cannot be combined"),
    (["-p", "99999"], "Invalid port number"),
    (["--tls-creds", "tls0"], "No TLS credentials with id 'tls0'"),
    (["--object", "secret,id=s0,data=x"], "--object type 'secret' is not supported"),
    (["--object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server",
      "--tls-creds", "t"], "Unable to access credentials"),
])
def test_refused(tmp_path, args, message):
    image, fmt = make_image(tmp_path, "raw")
    res = run(blockdrv_cmd("nbd", *args, "-f", fmt, str(image)), check=False, timeout=20)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_open_errors(tmp_path, nbd_server):
    res = run(blockdrv_cmd("nbd", "-k", str(tmp_path / "s"), str(tmp_path / "missing")),
              check=False, timeout=20)
    assert res.returncode == 1 and "Could not open" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    image, fmt = make_image(tmp_path, "dynamic")
    srv = nbd_server(image, "-f", fmt)           # holds the write lock
    res = run(blockdrv_cmd("nbd", "-k", str(tmp_path / "s2"), "-f", fmt, str(image)),
              check=False, timeout=20)
    assert res.returncode == 1 and 'Failed to get "write" lock' in res.stderr, res.stderr
    # -r -U shares it
    other = nbd_server(image, "-f", fmt, "-r", "-U")
    with Client(other.sock) as c:
        c.connect()
        assert c.read(0, 512).data == b"\x5a" * 512
        c.disconnect()
    assert srv.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fork_pidfile_and_signals(tmp_path, sig):
    """--fork returns once the server listens; the signal flushes and closes
    the image (its lock is free again), removes socket and pid file."""
    qemu_io = require_tool("qemu-io")
    image, fmt = make_image(tmp_path, "dynamic")
    sock, pidfile = str(tmp_path / "s.sock"), str(tmp_path / "nbd.pid")
    with open(tmp_path / "err.log", "wb") as err:
        res = subprocess.run(blockdrv_cmd("nbd", "--fork", "--pid-file", pidfile, "-t",
                                          "-k", sock, "-f", fmt, str(image)),
                             stdout=subprocess.DEVNULL, stderr=err, env=bd_env(), timeout=30)
    assert res.returncode == 0
    assert os.path.exists(sock)
    pid = int(open(pidfile).read())
    try:
        run([qemu_io, "-f", "raw", "-c", "write -P 0x66 4M 1M",
             f"nbd+unix:///?socket={sock}"])
        os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("server did not exit")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not os.path.exists(sock) and not os.path.exists(pidfile)
    # unlocked and durable: another writer opens it, the data is there
    res = run([qemu_io, "-f", fmt, "-c", "read -P 0x66 4M 1M", "-c", "write 8M 4k",
               str(image)])
    assert "verification failed" not in res.stdout
    assert_clean(image, fmt)


def test_shared_connections(tmp_path, nbd_server):
    """-e 2: two clients at once; a third waits until one leaves."""
    image, fmt = make_image(tmp_path, "raw")
    srv = nbd_server(image, "-f", fmt, "-e", "2", "-t")
    a, b = Client(srv.sock), Client(srv.sock)
    a.connect()
    b.connect()
    c = Client(srv.sock, timeout=1)
    with pytest.raises((socket.timeout, TimeoutError)):
        c.recv(P.GREETING.size)                      # in the backlog, not served
    a.disconnect()
    c.sock.settimeout(10)
    c.connect()
    assert c.read(0, 512).data == b"\x5a" * 512
    b.disconnect()
    c.disconnect()


def test_detect_zeroes_and_writethrough(tmp_path, nbd_server):
    image, fmt = make_image(tmp_path, "raw")
    srv = nbd_server(image, "-f", fmt, "--detect-zeroes=unmap", "--discard=unmap",
                     "--cache=writethrough")
    with Client(srv.sock) as c:
        c.connect(meta=["base:allocation"])
        assert c.write(0, bytes(MiB)).error == 0          # zeros: become a hole
        (n, flags), = c.block_status(0, MiB, P.CMD_FLAG_REQ_ONE)["base:allocation"]
        assert n == MiB and flags == P.STATE_HOLE | P.STATE_ZERO
        assert c.read(0, MiB).data == bytes(MiB)
        c.disconnect()
    assert srv.proc.wait(20) == 0
    with open(image, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_tcp(tmp_path):
    qemu_img = require_tool("qemu-img")
    image, fmt = make_image(tmp_path, "raw")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(blockdrv_cmd("nbd", "-b", "127.0.0.1", "-p", str(port), "-r",
                                         "-f", fmt, str(image)),
                            stderr=subprocess.PIPE, env=bd_env())
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.05)
        # the probe connection above was the server's first client: start
        # again persistent so qemu-img gets in
        proc.wait(10)
        proc = subprocess.Popen(blockdrv_cmd("nbd", "-b", "127.0.0.1", "-p", str(port),
                                             "-r", "-t", "-f", fmt, str(image)),
                                stderr=subprocess.PIPE, env=bd_env())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            res = run([qemu_img, "info", "--output=json", f"nbd://127.0.0.1:{port}"],
                      check=False)
            if res.returncode == 0:
                break
            time.sleep(0.1)
        assert f'"virtual-size": {IMAGE_SIZE}' in res.stdout, res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()


# -- TLS ---------------------------------------------------------------------------------

def _certs(tmp_path):
    openssl = require_tool("openssl")
    server, client = tmp_path / "server-pki", tmp_path / "client-pki"
    server.mkdir()
    client.mkdir()
    d = tmp_path / "pki"
    d.mkdir()
    sh = lambda *a: run([openssl, *a])                     # noqa: E731
    sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
       "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    for who, out, ext in (("server", server, "serverAuth"), ("client", client, "clientAuth")):
        sh("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
           "-keyout", str(out / f"{who}-key.pem"), "-out", str(d / f"{who}.csr"))
        extfile = d / f"{who}.ext"
        extfile.write_text(f"subjectAltName=DNS:localhost\nextendedKeyUsage={ext}\n"
                           "keyUsage=digitalSignature,keyEncipherment\n")
        sh("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca-cert.pem"),
           "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
           "-extfile", str(extfile), "-out", str(out / f"{who}-cert.pem"))
        (out / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    return server, client


def test_tls(tmp_path, nbd_server):
    qemu_img, nbdinfo = require_tool("qemu-img"), require_tool("nbdinfo")
    server_dir, client_dir = _certs(tmp_path)
    image, fmt = make_image(tmp_path, "dynamic")
    srv = nbd_server(image, "-f", fmt, "-t", "--object",
                     f"tls-creds-x509,id=tls0,dir={server_dir},endpoint=server",
                     "--tls-creds", "tls0")
    # without TLS: refused, politely
    with Client(srv.sock) as c:
        c.greet()
        assert c.go("")[0] == P.REP_ERR_TLS_REQD
        assert c.opt_replies(P.OPT_LIST)[-1][0] == P.REP_ERR_TLS_REQD
    res = run([qemu_img, "info", f"nbd+unix:///?socket={srv.sock}"], check=False)
    assert res.returncode != 0
    # qemu-img with x509 client credentials
    res = run([qemu_img, "compare", "--object",
               f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
               "--image-opts",
               f"driver=nbd,server.type=unix,server.path={srv.sock},tls-creds=tls0,"
               "tls-hostname=localhost", f"driver=raw,file.filename={reference(tmp_path)}"],
              check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # libnbd (gnutls)
    res = run([nbdinfo, "--size",
               f"nbds+unix:///?socket={srv.sock}&tls-certificates={client_dir}"],
              check=False)
    assert res.returncode == 0 and res.stdout.strip() == str(IMAGE_SIZE), res.stderr
    assert srv.stop() == 0
    assert_clean(image, fmt)
