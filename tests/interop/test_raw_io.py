"""One qemu-io script, two tools: ``qemu-io -f raw`` and ``blockdrv io -f raw``
must print the same (normalized) lines, exit alike and leave identical files
(same bytes and, for zero writes with -u and discards, the same holes)."""

from __future__ import annotations

import pytest

from blockdrv.testing.compare import compare_files, compare_guest, data_extents
from blockdrv.testing.qemu import random_script, replay_script
from blockdrv.testing.scripts import verify_reads

pytestmark = pytest.mark.interop

EDGE_CASES = {
    "unaligned": [
        "write -P 0x41 1 3", "write -P 0x42 511 2", "write -P 0x43 1000 5000",
        "write -P 0x44 4095 4097", "read -P 0x41 1 3", "read -P 0x43 1001 3000",
        "read -v 500 40", "read -v 4090 20",
    ],
    "spanning_end": [
        "write -P 0x11 63M 1M", "write -P 0x12 64M 512", "write -P 0x13 65535k 2k",
        "write -P 0x14 67108863 2", "read 65535k 2k", "read 64M 0", "read 65M 0",
        "write -z 65535k 2k", "discard 65535k 2k", "read -P 0x11 63M 1M",
    ],
    "zero_writes": [
        "write -P 0xff 0 1M", "write -z 4k 4k", "write -z -u 64k 64k",
        "write -z 100 1000", "write -z -u 200k 3", "write -z 0 0", "read -P 0 4k 4k",
        "read -P 0 64k 64k", "read -P 0 100 1000", "read -P 0xff 0 100", "map",
    ],
    "discards": [
        "write -P 0x66 0 2M", "discard 0 4k", "discard 1 1", "discard 1000 5000",
        "discard 1M 1M", "discard 2M 0", "read -P 0 1M 1M", "read -P 0x66 4k 4k",
        "read -v 0 32", "flush", "aio_flush",
    ],
    "out_of_range": [
        "read 64M 512", "read 63M 2M", "write 64M 1", "write -z 128M 512",
        "discard 100M 512", "read 0 2G", "write 0 3G", "read 1G 0", "length", "info",
    ],
    "parsing": [
        "read abc 1", "read -P 300 0 1", "read 0", "bogus", "write -z -P 1 0 512",
        "write -u 0 4k", "read -x 0 1", "read 0 1 2", "read 0 512 -P 0", "read 0 1.5k",
        "read 0 0x1k", "read 0 1e3", "read -- -1 512", "read -P 0 -s 4 -l 1 0 4",
        "r 0 1", "w -P 7 0 1", "d 0 1", "f", "l", "i", "", "read 0 8E",
    ],
    "truncate": [
        "write -P 0x33 0 64k", "truncate 1001", "length", "read -v 990 34",
        "write -P 0x34 1000 24", "truncate 2M", "length", "map", "truncate -m bogus 1M",
        "truncate abc",
    ],
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_case_scripts(replay_both, name):
    replay = replay_both(EDGE_CASES[name], fmt="raw", size="64M")
    replay.assert_same()


@pytest.mark.parametrize("seed", range(6))
def test_random_scripts(replay_both, seed):
    script = random_script(seed, size=64 << 20, n=60, max_len=3 << 20)
    replay = replay_both(script, fmt="raw", size="64M")
    replay.assert_same()
    assert "Pattern verification failed" not in replay.qemu.stdout
    # holes too: the allocation maps of both files agree
    assert data_extents(replay.qemu_path) == data_extents(replay.blockdrv_path)
    assert compare_guest(replay.qemu_path, replay.blockdrv_path, "raw", "raw") is None


def test_random_script_unaligned_image_size(replay_both):
    script = random_script(42, size=10 * 1024 * 1024 + 1000, n=40, max_len=1 << 20)
    replay = replay_both(script, fmt="raw", size=10 * 1024 * 1024 + 1000)
    replay.assert_same()


def test_read_only_replay(replay_both):
    replay = replay_both(["read 0 512", "write 0 512", "discard 0 512", "truncate 1M",
                          "map", "length"], readonly=True, size="1M")
    replay.assert_same()
    assert replay.qemu.rc == 1


def test_blockdrv_subprocess_matches(replay_both):
    replay = replay_both(EDGE_CASES["unaligned"], size="1M", subprocess_=True)
    replay.assert_same()


def test_qemu_made_file_reads_back_in_blockdrv(qemu_io, interop_tmp):
    """Direction qemu -> blockdrv: every range qemu-io wrote reads back in
    blockdrv io with the content qemu-io left there (no discards: their
    content is undefined)."""
    size = 8 << 20
    path = interop_tmp / "q.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    script = random_script(7, size=size, n=40, out_of_range=0,
                           weights={"read": 0, "flush": 0, "discard": 0})
    q = replay_script(script, path, "raw", "qemu")
    assert q.rc == 0, q.stdout + q.stderr
    checks = verify_reads(script, size)
    assert checks
    b = replay_script(checks, path, "raw", "blockdrv", readonly=True)
    assert b.rc == 0 and "verification failed" not in b.stdout, b.stdout + b.stderr


def sparse_pair(directory, size: int, offset: int, data: bytes):
    """Two ``size``-byte sparse files; the second has ``data`` at ``offset``."""
    a, b = directory / "a.raw", directory / "b.raw"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(size)
    with open(b, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return a, b


def test_harness_reports_first_difference(interop_tmp):
    a, b = sparse_pair(interop_tmp, 1 << 30, 123456789, b"\x01")
    diff = compare_files(a, b)
    assert diff is not None and diff.offset == 123456789
    assert compare_guest(a, b, "raw", "raw").offset == 123456789


def test_harness_reports_allocation_difference(interop_tmp):
    """Same bytes, different holes: equal unless ``extents`` is asked for."""
    # written zeros in b where a has a hole
    a, b = sparse_pair(interop_tmp, 4 << 20, 2 << 20, bytes(64 * 1024))
    if data_extents(b) == data_extents(a):
        pytest.skip("this file system does not keep holes")
    assert compare_files(a, b) is None
    diff = compare_files(a, b, extents="all")
    assert diff is not None and diff.offset == 2 << 20, diff
    assert compare_files(a, b, extents="payload") is not None   # raw: no prefix


@pytest.mark.parametrize("mode", [None, "ignore", "off", "unmap", "on"])
def test_discard_mode_as_qemu_io(qemu_io, interop_tmp, mode):
    """qemu-io passes discards down by default; ``-d ignore``/``off`` drops
    them (the data stays, no hole), ``-d unmap``/``on`` punches the hole."""
    import subprocess
    import sys
    from blockdrv.cli.io import normalize_qemu_io_output
    script = ["-c", "write -P 0x11 0 1M", "-c", "discard 0 512k", "-c", "read -P 0x11 0 1M"]
    flags = [] if mode is None else ["-d", mode]
    results = []
    for tool in ([qemu_io], [sys.executable, "-m", "blockdrv", "io"]):
        path = interop_tmp / f"{len(results)}.raw"
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        r = subprocess.run([*tool, "-f", "raw", *flags, *script, str(path)],
                           capture_output=True, text=True)
        results.append((r.returncode, normalize_qemu_io_output(r.stdout), r.stderr,
                        data_extents(str(path))))
    assert results[0] == results[1]
    dropped = mode in ("ignore", "off")
    assert ("Pattern verification failed" in results[0][1]) is not dropped
