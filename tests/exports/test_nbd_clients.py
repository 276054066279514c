"""Existing NBD clients against ``blockdrv nbd``: qemu-img, qemu-io, nbdinfo,
nbdcopy, on raw and every kind of VHDX.  Content is compared byte for byte
with a raw reference, and every image is checked clean after the session."""

from __future__ import annotations

import json
import os

import pytest

from blockdrv.testing.tools import require_tool

from .conftest import (IMAGE_SIZE, MiB, PATTERN_WRITES, assert_clean, blockdrv_cmd,
                       make_image, reference, run)

pytestmark = pytest.mark.interop

KINDS = ["raw", "dynamic", "fixed", "4k", "diff"]


def _map(uri: str, context: str | None = None) -> list[dict]:
    nbdinfo = require_tool("nbdinfo")
    args = [nbdinfo, "--json", "--map" if context is None else f"--map={context}", uri]
    return json.loads(run(args).stdout)


def _merged(extents: list[dict]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for e in extents:
        if out and out[-1][2] == e["type"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["offset"], e["length"], e["type"]])
    return [tuple(x) for x in out]


def _covering(extents: list[dict], off: int, n: int) -> list[dict]:
    return [e for e in extents if e["offset"] < off + n and e["offset"] + e["length"] > off]


@pytest.mark.parametrize("kind", KINDS)
def test_clients_read_write(tmp_path, nbd_server, kind):
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    nbdcopy = require_tool("nbdcopy")
    image, fmt = make_image(tmp_path, kind)
    ref = reference(tmp_path)
    srv = nbd_server(image, "-f", fmt, "-t", "-A")
    uri = srv.uri

    info = json.loads(run([qemu_img, "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == IMAGE_SIZE

    # What was written reads back: compare against the raw reference, and a
    # full convert must match it byte for byte.
    res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", uri, str(ref)], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "converted.raw"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(out)])
    assert out.read_bytes() == ref.read_bytes()
    copied = tmp_path / "copied.raw"
    run([nbdcopy, uri, str(copied)])
    assert copied.read_bytes() == ref.read_bytes()

    # base:allocation: written ranges are data, never zero; past the last
    # write a dynamic image (and a raw file with holes) reads as zeros.
    extents = _map(uri)
    assert sum(e["length"] for e in extents) == IMAGE_SIZE
    for off, n, _ in PATTERN_WRITES:
        for e in _covering(extents, off, n):
            assert not e["type"] & 2, (kind, off, e)       # not zero
    tail = _covering(extents, 30 * MiB, 2 * MiB)
    if kind != "fixed":
        assert all(e["type"] & 2 for e in tail), (kind, tail)

    # qemu:allocation-depth (-A): exactly what `blockdrv map` says (depth+1
    # where present, 0 where not); in the chain 1 where the child
    # allocates, 2 where its parent does.
    depth = _merged(_map(uri, "qemu:allocation-depth"))
    bmap = json.loads(run(blockdrv_cmd("map", "-U", "--output=json", "-f", fmt, str(image))).stdout)
    expected = _merged([{"offset": e["start"], "length": e["length"],
                         "type": e["depth"] + 1 if e["present"] else 0} for e in bmap])
    assert depth == expected
    if kind == "diff":
        assert [e[2] for e in depth if e[0] < MiB] == [2], depth
        off, n, _ = PATTERN_WRITES[1]
        assert {e[2] for e in depth if e[0] < off + n and e[0] + e[1] > off} == {1}, depth

    # Writes from qemu-io, unaligned and aligned, plus zeroes and discard.
    run([qemu_io, "-f", "raw",
         "-c", "write -P 0x77 3145728 65536",
         "-c", "write -P 0x99 10000 3000",           # unaligned: RMW in the node
         "-c", "write -z 20971520 65536",
         "-c", "flush", uri])
    res = run([qemu_io, "-f", "raw", "-c", "read -P 0x77 3145728 65536",
               "-c", "read -P 0x99 10000 3000", "-c", "read -P 0 20971520 65536",
               "-c", "read -P 0x11 21037056 65536", uri])
    assert "Pattern verification failed" not in res.stdout + res.stderr
    rc = srv.stop()
    assert rc == 0, srv.stderr()
    assert not os.path.exists(srv.sock)

    data = bytearray(ref.read_bytes())
    data[3145728:3145728 + 65536] = b"\x77" * 65536
    data[10000:13000] = b"\x99" * 3000
    data[20971520:20971520 + 65536] = bytes(65536)
    ref.write_bytes(data)
    assert_clean(image, fmt)
    res = run(blockdrv_cmd("compare", "-f", fmt, "-F", "raw", str(image), str(ref)),
              check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_wrong_byte_is_caught(tmp_path, nbd_server):
    """The oracle this file relies on fails on one wrong byte."""
    qemu_img = require_tool("qemu-img")
    image, fmt = make_image(tmp_path, "dynamic")
    ref = reference(tmp_path)
    data = bytearray(ref.read_bytes())
    data[5 * MiB + 4096 + 77] ^= 1
    ref.write_bytes(data)
    srv = nbd_server(image, "-f", fmt, "-r")
    res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(ref)],
              check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "mismatch" in res.stdout


def test_convert_into_export(tmp_path, nbd_server):
    """qemu-img convert -n writes a whole image into a writable VHDX export."""
    qemu_img = require_tool("qemu-img")
    nbdcopy = require_tool("nbdcopy")
    src, _ = make_image(tmp_path, "raw")
    target = tmp_path / "target.vhdx"
    run([qemu_img, "create", "-q", "-f", "vhdx", str(target), str(IMAGE_SIZE)])
    srv = nbd_server(target, "-f", "vhdx", "-t")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
    res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(src)],
              check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # nbdcopy uses zero requests (FAST_ZERO first) and multi-request pipelines
    run([nbdcopy, str(src), srv.uri])
    assert srv.stop() == 0
    assert_clean(target, "vhdx")
    res = run([qemu_img, "compare", "-f", "vhdx", "-F", "raw", str(target), str(src)],
              check=False)
    assert res.returncode == 0, res.stdout + res.stderr
