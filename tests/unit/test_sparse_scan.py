"""The zero-sector scan of convert against a sector-by-sector model."""

from __future__ import annotations

import random

import pytest

from blockdrv.engines.sparse import SECTOR, sector_runs


def model(buf: bytes, nbytes: int) -> tuple[list[int], list[bool]]:
    flags = []
    for pos in range(0, nbytes, SECTOR):
        flags.append(any(buf[pos:min(pos + SECTOR, nbytes)]))
    ends: list[int] = []
    data: list[bool] = []
    for i, flag in enumerate(flags):
        if data and data[-1] == flag:
            ends[-1] = i + 1
        else:
            ends.append(i + 1)
            data.append(flag)
    return ends, data


def sector(rng: random.Random, kind: str) -> bytes:
    if kind == "zero":
        return bytes(SECTOR)
    if kind == "lead0":                 # starts with zeros, data further in
        at = rng.randrange(1, SECTOR)
        return bytes(at) + b"\x01" + bytes(SECTOR - at - 1)
    if kind == "last":                  # only the last byte set
        return bytes(SECTOR - 1) + b"\x80"
    return rng.randbytes(SECTOR)


@pytest.mark.parametrize("seed", range(40))
def test_sector_runs_match_the_model(seed):
    rng = random.Random(seed)
    kinds = ["zero", "lead0", "last", "data"]
    count = rng.randrange(1, 300)
    buf = bytearray()
    while len(buf) < count * SECTOR:
        kind = rng.choice(kinds)
        buf += b"".join(sector(rng, kind) for _ in range(rng.choice([1, 1, 2, 7, 40])))
    nbytes = rng.randrange(1, len(buf) + 1) if seed % 3 else len(buf) // SECTOR * SECTOR
    if seed % 5 == 0:                    # a partial last sector of zeros
        buf[nbytes - nbytes % SECTOR:] = bytes(len(buf) - nbytes + nbytes % SECTOR)
    assert sector_runs(buf, nbytes) == model(bytes(buf), nbytes)


@pytest.mark.parametrize("buf", [bytes(4 * SECTOR), b"\x01" * (4 * SECTOR),
                                 bytes(SECTOR) + b"\x01" * 10, bytes(SECTOR + 10)])
def test_sector_runs_uniform_and_tails(buf):
    assert sector_runs(buf, len(buf)) == model(buf, len(buf))
