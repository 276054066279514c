"""Same qemu-io script on both tools -> identical VHDX files.

Each test creates one image with ``qemu-img create -f vhdx`` and copies it
(holes kept); ``qemu-io -f vhdx`` runs the script on one copy and
``blockdrv io -f vhdx`` (in-process) on the other.  Both must print the same
lines (timings masked), exit alike, and leave files that are byte-identical
after ``normalize_vhdx`` -- and allocated in the same places (SEEK_DATA/
SEEK_HOLE maps), since qemu writes only the guest's bytes into a new block
and the driver must too (``compare_files(..., "vhdx", extents="all")``).

Not covered here: qemu-io's ``aio_*`` commands (``blockdrv io`` implements
the synchronous ones of the design), ``truncate`` beyond the error message
(vhdx has no resize in qemu 7.2).
"""

from __future__ import annotations

import itertools

import pytest

from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import qemu_img_check, random_script
from blockdrv.testing.vhdx.scripts import (LOG_ENTRY_SIZE, edge_script, log_sequences,
                                           log_wrap_script)

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZES = (10 * MiB + 512, 33 * MiB)


def check(replay) -> None:
    replay.assert_same_output()
    diff = compare_files(replay.qemu_path, replay.blockdrv_path, "vhdx", extents="all")
    assert diff is None, str(diff)
    rc, report = qemu_img_check(replay.blockdrv_path, "vhdx")
    assert rc == 0, report


# -- the option matrix: every block size x log size x subformat x zero state,
#    on two sizes that are not block multiples ---------------------------------

MATRIX = [
    (size, bsize, log, sub, bsz)
    for (bsize, log, sub, bsz), size in zip(
        itertools.product((1, 8, 32, 256), (1, 8), ("dynamic", "fixed"), (True, False)),
        itertools.cycle(SIZES + SIZES[::-1]))
]


def _mid(case) -> str:
    size, bsize, log, sub, bsz = case
    return f"{size}-b{bsize}M-l{log}M-{sub}-zero_{'on' if bsz else 'off'}"


@pytest.mark.parametrize("case", MATRIX, ids=[_mid(c) for c in MATRIX])
def test_edge_script_matrix(replay_both, case):
    size, bsize, log, sub, bsz = case
    replay = replay_both(edge_script(size, bsize * MiB), fmt="vhdx", size=size,
                         block_size=f"{bsize}M", log_size=f"{log}M", subformat=sub,
                         block_state_zero=bsz)
    check(replay)
    assert "verification failed" not in replay.qemu.stdout
    # only the two requests crossing the end of the image fail (on both)
    assert replay.qemu.stdout.count("failed: Input/output error") == 2, replay.qemu.stdout


# -- hand-written scripts -------------------------------------------------------

EDGE = {
    "unaligned_rmw_same_block": [
        "write -P 0x41 1 3", "write -P 0x42 2 1", "write -P 0x43 510 4",
        "read -v 0 16", "read -v 504 16", "read -P 0 4 506",
    ],
    "one_write_many_blocks": [
        "write -P 0x51 100 5M", "read -P 0x51 100 5M", "read -P 0 0 100",
        "read -P 0 5243000 1000",
    ],
    "rewrite_allocated_in_place": [
        "write -P 1 1M 1M", "write -P 2 1M 512", "write -P 3 2096640 512",
        "read -P 2 1M 512", "read -P 1 1049088 1047040", "read -P 3 2096640 512",
        "read -P 0 0 1M",
    ],
    "zero_writes": [
        "write -z 0 1M", "write -z -u 1M 1M", "write -z 3M 100", "write -P 9 4M 4k",
        "write -z 4M 512", "write -z 5M 0", "read -P 0 0 4M", "read -P 0 4M 512",
        "read -P 9 4194816 3584", "map",
    ],
    "discards_are_noops": [
        "write -P 0x61 0 2M", "discard 0 1M", "discard 1M 512", "discard 7M 1M",
        "read -P 0x61 0 2M", "flush",
    ],
    "last_partial_block": [
        "write -P 0x71 10M 512", "read -P 0x71 10M 512", "write -P 0x72 10485759 2",
        "write -P 0x73 10M-100 100", "read -v 10485740 32", "read 10M 1024",
        "write -z 10M 512", "read -P 0 10M 512", "length",
    ],
    "unallocated_reads": [
        "read -P 0 0 10M", "read -v 5M 32", "read -P 0 10M 512", "write -P 1 5M 1",
        "read -P 0 0 5M", "read -P 0 5242881 1048575",
    ],
    "out_of_range": [
        "read 10485760 1024", "write 10M 1024", "write -z 11M 512", "read 20M 512",
        "discard 10M 1M", "read 0 0", "info", "length",
    ],
    # qemu passes an aligned zero-length write to the driver, which takes it
    # as the first guest-visible write (new DataWriteGuid); unaligned or
    # zero-write ones never reach it
    "zero_length_write_is_visible": ["write 1 0", "write -z 0 0", "write 0 0"],
    "zero_length_unaligned_write_is_not": ["write 1 0", "write -z 0 0", "read 0 0"],
    "zero_length_write_at_end": ["write 10486272 0"],
}


@pytest.mark.parametrize("name", sorted(EDGE))
def test_hand_written_scripts(replay_both, name):
    replay = replay_both(EDGE[name], fmt="vhdx", size=10 * MiB + 512,
                         block_size="1M", log_size="1M")
    check(replay)
    assert "verification failed" not in replay.qemu.stdout


def test_truncate_beyond_qemu(replay_both):
    """qemu 7.2 cannot resize VHDX; blockdrv can (spec-conformant, through the
    log: tests/interop/test_vhdx_resize.py) -- the one intended divergence."""
    replay = replay_both(["write -P 1 0 512", "truncate 20M", "length"], fmt="vhdx",
                         size="4M")
    assert "does not support resize" in replay.qemu.stderr
    assert "does not support resize" not in replay.blockdrv.stderr
    assert "20 MiB" in replay.blockdrv.stdout, replay.blockdrv.stdout
    rc, report = qemu_img_check(replay.blockdrv_path, "vhdx")
    assert rc == 0, report


def test_sessions_reopen_between_commands(replay_both):
    """Several open/close cycles: header sequence numbers, FileWriteGuid per
    session and DataWriteGuid per first write behave alike."""
    script = edge_script(10 * MiB + 512, MiB) + ["read -P 0 0 0", "info"]
    replay = replay_both(script, fmt="vhdx", size=10 * MiB + 512, block_size="1M",
                         log_size="1M", batch=5)
    check(replay)


def test_blockdrv_io_as_a_subprocess(replay_both):
    replay = replay_both(EDGE["last_partial_block"], fmt="vhdx", size=10 * MiB + 512,
                         block_size="1M", log_size="1M", subprocess_=True)
    check(replay)


def test_read_only_session_writes_nothing(replay_both):
    replay = replay_both(["read 0 1M", "write -P 1 0 512", "write -z 0 512", "map"],
                         fmt="vhdx", size="8M", readonly=True)
    check(replay)
    assert replay.qemu.rc == 1


# -- seeded random scripts --------------------------------------------------------

RANDOM_OPTS = [
    dict(block_size="1M", log_size="1M"),
    dict(block_size="8M", log_size="1M", block_state_zero=False),
    dict(block_size="1M", log_size="8M", subformat="fixed"),
    dict(block_size="32M", log_size="1M", subformat="fixed", block_state_zero=False),
]


def _random(replay_both, seed: int, size: int, n: int) -> None:
    opts = RANDOM_OPTS[seed % len(RANDOM_OPTS)]
    script = random_script(seed, size, n=n, max_len=3 * MiB, flush_every=17)
    replay = replay_both(script, fmt="vhdx", size=size, **opts)
    check(replay)
    assert "verification failed" not in replay.qemu.stdout


@pytest.mark.parametrize("seed", range(10))
def test_random_scripts(replay_both, seed):
    _random(replay_both, seed, SIZES[seed % 2], 60)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 60))
def test_random_scripts_slow(replay_both, seed):
    _random(replay_both, seed, (SIZES + (100 * MiB + 4096,))[seed % 3], 150)


# -- long scripts that wrap the 1 MiB log ------------------------------------------

def _assert_wrapped(path) -> None:
    seqs = [seq for _, seq in log_sequences(path)]
    assert any(b < a for a, b in zip(seqs, seqs[1:])), f"log did not wrap: {seqs}"


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_long_script_wraps_1m_log(replay_both, sub):
    size = 150 * MiB
    writes = 140
    assert writes * LOG_ENTRY_SIZE > MiB       # more entries than the log holds
    replay = replay_both(log_wrap_script(size, MiB, writes, seed=1), fmt="vhdx",
                         size=size, block_size="1M", log_size="1M", subformat=sub)
    check(replay)
    assert "verification failed" not in replay.qemu.stdout
    _assert_wrapped(replay.qemu_path)


@pytest.mark.slow
@pytest.mark.parametrize("log", ["1M", "8M"])
def test_long_script_wraps_log_many_times(replay_both, log):
    size = 1100 * MiB
    replay = replay_both(log_wrap_script(size, MiB, 1100, seed=2), fmt="vhdx",
                         size=size, block_size="1M", log_size=log)
    check(replay)
    assert "verification failed" not in replay.qemu.stdout
    _assert_wrapped(replay.qemu_path)
