"""Same qemu-io script on both tools -> identical qcow2 files.

Each case makes one image with ``qemu-img create -f qcow2`` (and its backing
file, raw or qcow2, with data written by qemu-io), copies it, runs a seeded
random script (pattern writes of any size and alignment, ``write -z``,
``write -z -u``, discards, reads checked against a model, flushes) with
``qemu-io`` on one copy and ``blockdrv io`` on the other, and asserts: the
same output, byte-identical files (no masking: qcow2 has no GUIDs or
timestamps), ``qemu-img check`` clean and ``qemu-img compare`` equal.

Over cluster sizes 512 to 2M, compat 0.10 and 1.1, lazy refcounts on and
off, extended L2 entries, without a backing file and over raw and qcow2 ones; image sizes that
are not cluster multiples, so the partial last cluster's discard (qemu
discards it whole) is exercised too.
"""

from __future__ import annotations

import itertools

import pytest

from blockdrv.testing.compare import compare_files
from blockdrv.testing.qemu import (qemu_img_check, run_qemu_img, run_qemu_io,
                                   random_script)

pytestmark = pytest.mark.interop

MiB = 1 << 20
CLUSTERS = (512, 4096, 65536, 2 * MiB)
LEVELS = (("0.10", False), ("1.1", False), ("1.1", True))
BACKINGS = (None, "raw", "qcow2")
CASES = list(itertools.product(CLUSTERS, LEVELS, BACKINGS))
# extended L2 entries (v3, clusters of 16 KiB and more), lazy refcounts on
# every other case
CASES += [(cs, ("1.1", i % 2 == 1), backing, "extl2") for i, (cs, backing) in
          enumerate(itertools.product((16384, 65536, 2 * MiB), BACKINGS))]
# the default suite: every cluster size x level once, the backing kinds in
# turn; the other two thirds are slow (every metadata step is an fdatasync)
QUICK = [c for i, c in enumerate(CASES) if i % 3 == (i // 3 + i // 9) % 3]


def _id(case) -> str:
    cs, (compat, lazy), backing = case[:3]
    ext = "-extl2" if len(case) > 3 else ""
    return f"c{cs}-{compat}{ext}{'-lazy' if lazy else ''}-{backing or 'nobacking'}"


def _template(tmp, case, size: int) -> str:
    cs, (compat, lazy), backing = case[:3]
    opts = f"cluster_size={cs},compat={compat}" + (",lazy_refcounts=on" if lazy else "")
    if len(case) > 3:
        opts += ",extended_l2=on"
    extra = []
    if backing:
        base = str(tmp / f"base.{backing}")
        rc, _, err = run_qemu_img("create", "-q", "-f", backing, base, str(size))
        assert rc == 0, err
        # data the overlay's copy-on-write must carry over, with holes between
        rc, out, err = run_qemu_io(base, ["write -P 0x5a 0 1M", "write -P 0x6b 3M 2M",
                                          "write -P 0x7c 9000000 3000000"], fmt=backing)
        assert rc == 0, (out, err)
        extra = ["-b", base, "-F", backing]
    path = str(tmp / "template.qcow2")
    rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *extra, path,
                              str(size))
    assert rc == 0, err
    return path


def _run(replay_both, tmp_path, case, seed: int, n: int, figures) -> None:
    cs = case[0]
    size = 24 * MiB + 3584
    image = _template(tmp_path, case, size)
    script = random_script(seed, size, n=n, max_len=max(3 * MiB, 2 * cs),
                           weights={"zero": 2, "discard": 1.5}, flush_every=13)
    if case[2]:
        # the model behind the script's read -P knows no backing data: read
        # plainly there, qemu-img compare checks the guest data instead
        script = [" ".join(c.split()[:1] + c.split()[3:]) if c.startswith("read -P") else c
                  for c in script]
    replay = replay_both(script, fmt="qcow2", image=image)
    replay.assert_same_output()
    assert "verification failed" not in replay.qemu.stdout
    diff = compare_files(replay.qemu_path, replay.blockdrv_path, "raw")
    figures("qcow2 write", "byte-identical scripts", tried=1, survived=int(diff is None))
    assert diff is None, str(diff)
    rc, report = qemu_img_check(replay.blockdrv_path, "qcow2")
    assert rc == 0, report
    rc, out, err = run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2",
                                replay.qemu_path, replay.blockdrv_path)
    assert rc == 0, out + err


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES], ids=[_id(c) for c in CASES])
def test_random_script_same_file(replay_both, tmp_path, case, figures):
    _run(replay_both, tmp_path, case, CASES.index(case), 40, figures)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 136))
def test_random_script_same_file_long(replay_both, tmp_path, seed, figures):
    _run(replay_both, tmp_path, CASES[seed % len(CASES)], seed, 150, figures)


# -- images qemu made in other ways: snapshots (shared clusters and L2 tables
#    copied on write), compressed clusters, metadata preallocation, refcount
#    widths with refcount table growth, zstd; zero writes over data --------------

SCRIPT = ["write -P 0x22 0 100k", "write -P 0x33 1M 64k", "write -z 3M 2M",
          "write -P 0x44 2200k 1M", "write -z -u 2M 128k", "discard 3M 1M",
          "write -P 0x55 8191k 2k", "write -z 1000 70000", "write -z 10M 3"]
BIG = ["write -P 9 0 8M", "write -z -u 1M 3M", "discard 5M 2M", "write -P 8 30M 4M"]
# subclusters: partial zero writes, writes between zero and unallocated ones
SUB = ["write -P 0x66 5000 3000", "write -z 5k 2k", "write -P 0x77 6k 100",
       "write -z 12k 4k", "write -P 0x78 13k 1", "discard 0 64k", "write -P 0x79 70k 1k"]
ZERO = ["write -z 0 1M", "write -z 2M 2M", "write -z -u 1M 1M", "write -P 3 100k 10k",
        "write -z 200k 1k", "write -z -u 4M 64k"]

EDGES = {
    "snapshot": ("", "16M", ["write -P 1 0 4M", "write -z 5M 1M"], True, SCRIPT),
    "snapshot-v2-4k": ("compat=0.10,cluster_size=4k", "16M", ["write -P 1 0 4M"], True,
                       SCRIPT),
    "compressed": ("compress", "16M", None, False, SCRIPT),
    "compressed-v2-4k": ("compress:cluster_size=4k,compat=0.10", "16M", None, False,
                         SCRIPT),
    "prealloc": ("preallocation=metadata", "16M", None, False, SCRIPT),
    "prealloc-v2-2M": ("preallocation=metadata,compat=0.10,cluster_size=2M", "16M", None,
                       False, SCRIPT),
    "refcount1-growth": ("refcount_bits=1,cluster_size=512", "64M", None, False, BIG),
    "refcount64-growth": ("refcount_bits=64,cluster_size=512", "64M", None, False, BIG),
    "refcount8-lazy": ("refcount_bits=8,cluster_size=1k,lazy_refcounts=on", "64M", None,
                       False, BIG),
    "zstd": ("compression_type=zstd", "16M", None, False, SCRIPT),
    "zero-over-data": ("", "16M", ["write -P 1 0 4M"], False, ZERO),
    "zero-over-data-v2": ("compat=0.10", "16M", ["write -P 1 0 4M"], False, ZERO),
    "extl2": ("extended_l2=on", "16M", None, False, SCRIPT + SUB),
    "extl2-16k": ("extended_l2=on,cluster_size=16k", "16M", None, False, SCRIPT + SUB),
    "extl2-prealloc": ("extended_l2=on,preallocation=metadata", "16M", None, False,
                       SCRIPT + SUB),
    "extl2-compressed": ("compress:extended_l2=on", "16M", None, False, SCRIPT + SUB),
    "extl2-zero-over-data": ("extended_l2=on", "16M", ["write -P 1 0 4M"], False,
                             ZERO + SUB),
}


def _edge_image(tmp, opts, size, setup, snapshot) -> str:
    path = str(tmp / "edge.qcow2")
    if opts.startswith("compress"):
        raw = str(tmp / "data.raw")
        assert run_qemu_img("create", "-q", "-f", "raw", raw, size)[0] == 0
        assert run_qemu_io(raw, ["write -P 7 0 6M"], fmt="raw")[0] == 0
        extra = opts.partition(":")[2]
        rc, _, err = run_qemu_img("convert", "-c", "-O", "qcow2",
                                  *(["-o", extra] if extra else []), raw, path)
    else:
        rc, _, err = run_qemu_img("create", "-q", "-f", "qcow2",
                                  *(["-o", opts] if opts else []), path, size)
    assert rc == 0, err
    if setup:
        rc, out, err = run_qemu_io(path, setup, fmt="qcow2")
        assert rc == 0, (out, err)
    if snapshot:
        assert run_qemu_img("snapshot", "-c", "s1", path)[0] == 0
    return path


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_images_same_file(replay_both, tmp_path, name, figures):
    opts, size, setup, snapshot, script = EDGES[name]
    image = _edge_image(tmp_path, opts, size, setup, snapshot)
    replay = replay_both(script, fmt="qcow2", image=image)
    replay.assert_same_output()
    diff = compare_files(replay.qemu_path, replay.blockdrv_path, "raw")
    figures("qcow2 write", "byte-identical edge images", tried=1,
            survived=int(diff is None))
    assert diff is None, str(diff)
    rc, report = qemu_img_check(replay.blockdrv_path, "qcow2")
    assert rc == 0, report


# -- the dirty bit and the refusals -------------------------------------------------

def test_lazy_refcounts_dirty_bit_during_session(tmp_path):
    import blockdrv
    path = str(tmp_path / "lazy.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path,
                        "8M")[0] == 0

    def incompat():
        with open(path, "rb") as f:
            f.seek(72)
            return int.from_bytes(f.read(8), "big")
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(4096, b"\x01" * 512)          # in a new cluster: an L2 update
        img.flush()
        assert incompat() & 1                   # set before the first L2 update
    assert incompat() == 0                      # cleared by the clean close
    assert qemu_img_check(path, "qcow2")[0] == 0


@pytest.mark.parametrize("bits,word", [(2, "corrupt"), (1 << 9, "Unsupported qcow2 feature")])
def test_corrupt_or_unknown_feature_refused_for_writing(tmp_path, capsys, bits, word):
    """The corrupt bit refuses a read-write open (as qemu, reads still work);
    an unknown incompatible feature refuses every open (as qemu)."""
    from blockdrv.cli import main
    path = str(tmp_path / "img.qcow2")
    assert run_qemu_img("create", "-q", "-f", "qcow2", path, "8M")[0] == 0
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(bits.to_bytes(8, "big"))
    before = open(path, "rb").read()
    assert main(["io", "-c", "write -P 2 0 4k", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err
    assert open(path, "rb").read() == before
    rc, _, err = run_qemu_io(path, ["write -P 2 0 4k"], fmt="qcow2")
    assert rc != 0                                  # qemu refuses alike
    assert main(["io", "-r", "-c", "read 0 4k", path]) == (0 if bits == 2 else 1)
