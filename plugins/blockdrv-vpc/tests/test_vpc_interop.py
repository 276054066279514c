"""qemu-io scripts on both tools, each tool reading the other's images,
map, convert between vpc, vhdx and raw in every direction, bad images."""

from __future__ import annotations

import shutil
import struct

import pytest

from blockdrv.testing.compare import compare_files, compare_guest
from blockdrv.testing.qemu import qemu_img_create, random_script, replay_script, run_qemu_io

from vpc_helpers import (MiB, compare_vpc, info_json, map_json, run_blockdrv, run_tool,
                         unprog, virtual_size)

# (create options, size) of the images the scripts run on
IMAGES = {
    "dynamic": ({}, 64 * MiB),
    "dynamic-force": ({"force_size": True}, 40 * MiB + 512),
    "fixed": ({"subformat": "fixed"}, 24 * MiB),
}
# scripts only: writes scattered over the largest image (sparse, 1044480 BAT entries)
BIG = {"dynamic-2040G": ({}, 2040 << 30)}


def _replay(replay_both, kind, script, tmp_path):
    opts, size = {**IMAGES, **BIG}[kind]
    r = replay_both(script, fmt="vpc", size=size, **opts)
    out = r.output_difference()
    files = compare_vpc(r.qemu_path, r.blockdrv_path, tmp_path)
    return r, out, files


@pytest.mark.parametrize("kind,seed", [(k, s) for k in IMAGES for s in range(8)]
                         + [(k, s) for k in BIG for s in range(3)])
def test_random_script_same_output_same_file(kind, seed, replay_both, tmp_path, figures):
    opts, size = {**IMAGES, **BIG}[kind]
    probe = tmp_path / "probe.vhd"
    qemu_img_create(probe, "vpc", size, **opts)
    vsize = virtual_size(probe)
    script = random_script(seed * 7 + len(kind), vsize, n=60, max_len=3 * MiB,
                           flush_every=9)
    r, out, files = _replay(replay_both, kind, script, tmp_path)
    maps = (map_json("qemu", r.qemu_path), map_json("blockdrv", r.blockdrv_path))
    same = out is None and files is None and maps[0] == maps[1]
    figures("vpc", "interop: qemu-io scripts", compared=1, identical=int(same))
    assert out is None, out
    assert files is None, files
    assert maps[0] == maps[1]


@pytest.mark.parametrize("writer", ["qemu", "blockdrv"])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_each_tool_reads_the_others_images(writer, kind, tmp_path, figures):
    """One tool writes a seeded script; the other reads every written range
    back with the pattern (the script's own -P reads), and both map it alike."""
    opts, size = IMAGES[kind]
    path = tmp_path / "img.vhd"
    qemu_img_create(path, "vpc", size, **opts)
    vsize = virtual_size(path)
    script = random_script(100 + len(kind), vsize, n=40, max_len=2 * MiB,
                           weights={"read": 0, "discard": 0, "flush": 0})
    res = replay_script(script, path, "vpc", writer)
    assert res.rc == 0, res.stderr
    reader = "blockdrv" if writer == "qemu" else "qemu"
    # re-read: the writes' ranges verified by pattern on the other tool
    checks = []
    for cmd in script:
        parts = cmd.split()
        if parts[0] == "write" and parts[1] == "-P":
            checks.append(f"read -P {parts[2]} {parts[3]} {parts[4]}")
    checks = _latest_only(script, checks)
    got = replay_script(checks, path, "vpc", reader, readonly=True)
    ok = got.rc == 0 and "Pattern verification failed" not in got.stdout + got.stderr
    raw = tmp_path / "img.raw"
    rc, _, err = run_tool(reader, "convert", "-f", "vpc", "-O", "raw", path, raw)
    assert rc == 0, err
    same_map = map_json("qemu", path) == map_json("blockdrv", path)
    guest = compare_guest(path, raw, "vpc", "raw")
    figures("vpc", "interop: cross-reading", compared=1,
            identical=int(ok and same_map and guest is None))
    assert ok, got.stdout[-2000:] + got.stderr
    assert same_map
    assert guest is None, guest


def _latest_only(script, checks):
    """Drop pattern checks of ranges that a later write overlapped."""
    writes = []
    for cmd in script:
        p = cmd.split()
        if p[0] == "write":
            off, n = int(p[-2]), int(p[-1])
            writes.append((off, off + n))
    out = []
    wi = [w for w in writes]
    pat_idx = [i for i, cmd in enumerate(script) if cmd.startswith("write -P")]
    all_w = [(i, (int(c.split()[-2]), int(c.split()[-2]) + int(c.split()[-1])))
             for i, c in enumerate(script) if c.startswith("write")]
    for check, i in zip(checks, pat_idx):
        s, e = int(check.split()[-2]), int(check.split()[-2]) + int(check.split()[-1])
        if not any(j > i and a < e and b > s for j, (a, b) in all_w):
            out.append(check)
    del wi
    return out


# -- convert ------------------------------------------------------------------

SOURCE_SIZE = 20 * MiB + 4096


def _make_source(fmt, path, opts=None):
    qemu_img_create(path, fmt, SOURCE_SIZE, **(opts or {}))
    script = ["write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -P 0x33 7340032 5000",
              "write -P 0x44 12M 2M", f"write -P 0x55 {SOURCE_SIZE - 8192} 8192"]
    rc, out, err = run_qemu_io(path, script, fmt)
    assert rc == 0, err


TARGETS = [("raw", []), ("vhdx", []), ("vpc", []),
           ("vpc", ["-o", "subformat=fixed"]), ("vpc", ["-o", "force_size=on"]),
           ("vpc", ["-o", "subformat=fixed,force_size=on"])]
SOURCES = [("raw", {}), ("vhdx", {}), ("vpc", {}), ("vpc", {"subformat": "fixed"}),
           ("vpc", {"force_size": True})]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t[0] + "".join(t[1][1:]))
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s[0] + "".join(
    f"-{k}" for k in s[1]))
def test_convert_every_direction(source, target, tmp_path, figures):
    sfmt, sopts = source
    tfmt, topts = target
    src = tmp_path / f"src.{sfmt}"
    _make_source(sfmt, src, sopts)
    outs = {}
    for tool in ("qemu", "blockdrv"):
        dst = tmp_path / f"{tool}.{tfmt}"
        rc, out, err = run_tool(tool, "convert", "-f", sfmt, "-O", tfmt, *topts, src, dst)
        assert rc == 0, (tool, err)
        outs[tool] = (dst, out, err)
    q, b = outs["qemu"][0], outs["blockdrv"][0]
    azure = tfmt == "vpc" and "force_size=on" in "".join(topts) and "fixed" in "".join(topts)
    if azure and SOURCE_SIZE % MiB:
        # beyond qemu: rounded up to whole MiB, and said so
        assert "rounded up to" in outs["blockdrv"][2], outs["blockdrv"][2]
        diff = None
        assert virtual_size(b) == -(-SOURCE_SIZE // MiB) * MiB
        ident = compare_guest(src, b, sfmt, tfmt, check_size=False) is None
    else:
        if tfmt == "vpc":
            diff = compare_vpc(q, b, tmp_path)
        else:
            d = compare_files(q, b, tfmt)
            diff = None if d is None else str(d)
        ident = diff is None
    guest = compare_guest(src, b, sfmt, tfmt, check_size=False)
    figures("vpc", "interop: convert", compared=1, identical=int(ident and guest is None))
    assert diff is None, diff
    assert guest is None, guest


# -- bad images ---------------------------------------------------------------------

def _seal(f: bytearray) -> None:
    f[64:68] = b"\0" * 4
    f[64:68] = struct.pack(">I", ~sum(f) & 0xFFFFFFFF)


def _patch_footers(d: bytearray, fn) -> None:
    for off in (0, len(d) - 512):
        if d[off:off + 8] == b"conectix":
            f = d[off:off + 512]
            fn(f)
            _seal(f)
            d[off:off + 512] = f


BAD = {
    "bad-checksum": lambda d: d.__setitem__(slice(70, 71), bytes([d[70] ^ 1])),
    "no-footer": lambda d: (d.__setitem__(slice(0, 8), b"xxxxxxxx"),
                            d.__setitem__(slice(len(d) - 512, len(d) - 504), b"yyyyyyyy")),
    "table-past-eof": lambda d: d.__setitem__(slice(528, 536), struct.pack(">Q", 1 << 30)),
    "over-2040G": lambda d: _patch_footers(d, lambda f: (
        f.__setitem__(slice(28, 32), b"qem2"),
        f.__setitem__(slice(48, 56), struct.pack(">Q", 2041 << 30)))),
    "block-size": lambda d: d.__setitem__(slice(544, 548), struct.pack(">I", 3000)),
    "header-magic": lambda d: d.__setitem__(slice(512, 520), b"xxxxxxxx"),
    "page-table-small": lambda d: d.__setitem__(slice(540, 544), struct.pack(">I", 0)),
    "truncated": lambda d: d.__delitem__(slice(100000, None)),
    "truncated-in-footer": lambda d: d.__delitem__(slice(len(d) - 100, None)),
    "tiny": lambda d: d.__delitem__(slice(6, None)),
    "empty": lambda d: d.clear(),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_qemus_messages(case, tmp_path, figures):
    base = tmp_path / "base.vhd"
    qemu_img_create(base, "vpc", 10 * MiB)
    rc, _, err = run_qemu_io(base, ["write -P 1 0 64k", "write -P 2 5M 4k"], "vpc")
    assert rc == 0, err
    data = bytearray(base.read_bytes())
    BAD[case](data)
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(bytes(data))
    before = bad.read_bytes()
    results = []
    for tool in ("qemu", "blockdrv"):
        r = []
        for args in (["info", "-f", "vpc"], ["map", "-f", "vpc"], ["convert", "-f", "vpc",
                                                                   "-O", "raw"]):
            extra = [tmp_path / f"{tool}.raw"] if args[0] == "convert" else []
            rc, out, err = run_tool(tool, *args, bad, *extra)
            r.append((rc != 0, unprog(err)))
        mine = tmp_path / f"{tool}.vhd"
        shutil.copy(bad, mine)
        rc, out, err = (run_qemu_io if tool == "qemu" else _blockdrv_io)(
            mine, ["write -P 9 0 4k"], "vpc")
        r.append((rc != 0, unprog(err + out).replace("can't open device", "")))
        results.append(r)
        if results[0][0][0] and tool == "blockdrv":      # qemu refuses it: invalid
            assert mine.read_bytes() == before, "an invalid image was written to"
    assert bad.read_bytes() == before
    if results[0][2][0]:                                  # qemu's convert failed
        assert not (tmp_path / "blockdrv.raw").exists(), "a failed convert left a file"
    same = results[0][:3] == results[1][:3] and results[0][3][0] == results[1][3][0]
    figures("vpc", "interop: bad images", compared=1, identical=int(same))
    assert results[0][:3] == results[1][:3]
    assert results[0][3][0] == results[1][3][0]


def _blockdrv_io(path, commands, fmt):
    args = ["io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    return run_blockdrv(*args, path)


def test_differencing_image_refused(tmp_path):
    base = tmp_path / "base.vhd"
    qemu_img_create(base, "vpc", 10 * MiB)
    d = bytearray(base.read_bytes())
    _patch_footers(d, lambda f: f.__setitem__(slice(60, 64), struct.pack(">I", 4)))
    base.write_bytes(bytes(d))
    rc, out, err = run_blockdrv("info", base)
    assert rc == 1
    assert "differencing images (disk type 4) are not supported" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fixed_vhd_probes_as_raw_like_qemu(tmp_path):
    path = tmp_path / "f.vhd"
    qemu_img_create(path, "vpc", 4 * MiB, subformat="fixed")
    assert info_json("qemu", path, None)[1]["format"] == "raw"
    assert info_json("blockdrv", path, None)[1]["format"] == "raw"
