"""commit, rebase and measure engines (blockdrv.engines.{commit,rebase,measure})
and their VHDX hooks; the crash matrix of commit and rebase.

Crash matrix: a dedicated cut-point loop (the plan-based engine of
blockdrv.testing.crash drives guest writes of one image; commit and rebase
write two).  Every write and flush of the image being changed -- the base
for commit's copy, the child for its re-link and emptying, the child for
rebase -- is a cut point: a ``blkdebug`` crash rule fires there (unflushed
writes kept, lost, or a seeded subset kept; every later request fails, so
the engine stops as a dying process would).  After each cut:

* the top image opens with its chain and reads exactly what it read before
  the command (the guest view never changes);
* every image of the chain passes ``check`` (after its log is replayed);
* a run the crash did not stop left the base holding the top's view
  (commit) or the child on its new parent (rebase).
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

import blockdrv
from blockdrv.errors import BlockDriverError
from blockdrv.engines.commit import commit
from blockdrv.engines.measure import measure
from blockdrv.engines.rebase import rebase
from blockdrv.plugins import get_registry
from blockdrv.protocols import blkdebug
from blockdrv.testing.scripts import run_blockdrv

MiB = 1 << 20
MODES = (("keep", "fail"), ("lose", "fail"), ("random", "fail"))


def view(path, **opts) -> bytes:
    with blockdrv.open_image(path, **opts) as img:
        return img.read(0, img.size)


def make_chain(tmp, seed=1, size=8 * MiB):
    base, top = tmp / "base.vhdx", tmp / "top.vhdx"
    blockdrv.create_image(base, "vhdx", size, block_size="1M").close()
    rng = random.Random(seed)
    with blockdrv.open_image(base, readonly=False) as img:
        for _ in range(4):
            img.write(rng.randrange(0, size // 4096 - 64) * 4096, rng.randbytes(64 * 1024))
    blockdrv.create_image(top, "vhdx", backing_file="base.vhdx").close()
    with blockdrv.open_image(top, readonly=False) as img:
        img.write(512, rng.randbytes(1024))
        for _ in range(5):
            n = rng.choice([512, 8192, 300 * 1024])
            img.write(rng.randrange(0, (size - n) // 512) * 512, rng.randbytes(n))
    return base, top


# ------------------------------------------------------------------ hooks

def test_hooks_are_bound():
    reg = get_registry()
    vhdx, raw = reg.format("vhdx"), reg.format("raw")
    assert vhdx.bdrv_make_empty and vhdx.bdrv_change_backing_file and vhdx.bdrv_measure
    assert raw.bdrv_measure and raw.bdrv_make_empty is None


def test_make_empty_refuses_a_dynamic_image(tmp_path):
    p = tmp_path / "d.vhdx"
    blockdrv.create_image(p, "vhdx", "4M").close()
    with blockdrv.open_image(p, readonly=False) as img:
        from blockdrv.coroutine import run_sync
        with pytest.raises(BlockDriverError, match="differencing"):
            run_sync(img.bs.drv.bdrv_make_empty(img.bs))


def test_commit_errors(tmp_path):
    p = tmp_path / "d.vhdx"
    blockdrv.create_image(p, "vhdx", "4M").close()
    with pytest.raises(BlockDriverError, match="does not have a backing file"):
        commit(str(p))
    base, top = make_chain(tmp_path)
    with pytest.raises(BlockDriverError, match="Did not find 'nope.vhdx'"):
        commit(str(top), base="nope.vhdx")
    rc, _, err = run_blockdrv("commit", "-t", "bogus", top)
    assert rc == 1 and "cache" in err


def test_commit_and_rebase_keep_the_view(tmp_path):
    base, top = make_chain(tmp_path)
    want = view(top)
    res = commit(str(top))
    assert res.emptied and res.bytes_committed > 0
    assert view(top) == want and view(base) == want
    # a second commit has nothing to copy
    assert commit(str(top)).bytes_committed == 0
    other = tmp_path / "other.vhdx"
    blockdrv.create_image(other, "vhdx", 8 * MiB, block_size="1M").close()
    with blockdrv.open_image(other, readonly=False) as img:
        img.write(MiB, b"\x5a" * MiB)
    copied = rebase(str(top), "other.vhdx")
    assert copied > 0 and view(top) == want
    with blockdrv.open_image(top) as img:
        assert img.bs.backing.filename.endswith("other.vhdx")


def test_locator_old_doubled_backslash_form_still_read(tmp_path):
    from blockdrv.coroutine import run_sync
    from blockdrv.drivers.vhdx import parent as vparent
    base, top = make_chain(tmp_path)
    want = view(top)
    with blockdrv.open_image(top, readonly=False) as img:
        vimg = img.bs.opaque
        loc = vparent.ParentLocator(vimg.params.parent_locator.locator_type, {
            "parent_linkage": vimg.params.parent_locator.entries["parent_linkage"],
            "absolute_win32_path": "\\\\?\\" + str(base).replace("/", "\\")})
        async def write():
            async with vimg.lock:
                await vparent.co_write_locator(vimg, loc)
        run_sync(write())
    assert view(top) == want


def test_win32_absolute_only_where_windows_can_resolve_it():
    from blockdrv.drivers.vhdx.parent import build_locator, win32_absolute
    assert win32_absolute("/mnt/d/vms/base.vhdx") == "\\\\?\\D:\\vms\\base.vhdx"
    assert win32_absolute("/mnt/c") == "\\\\?\\C:\\"
    assert win32_absolute("/srv/vm/base.vhdx") is None
    assert win32_absolute("/mnt/data/base.vhdx") is None         # not a drive letter
    loc = build_locator("/mnt/d/vms/c.vhdx", "/mnt/d/base.vhdx", b"\x01" * 16)
    assert loc.entries["relative_path"] == "..\\base.vhdx"
    assert loc.entries["absolute_win32_path"] == "\\\\?\\D:\\base.vhdx"
    assert set(build_locator("/srv/c.vhdx", "/srv/b.vhdx", b"\x01" * 16).entries) == \
        {"parent_linkage", "relative_path"}


def test_missing_parent_lists_each_path_once(tmp_path):
    base, top = make_chain(tmp_path)
    os.unlink(base)
    with pytest.raises(BlockDriverError) as exc:
        blockdrv.open_image(top)
    msg = str(exc.value)
    assert msg.count("base.vhdx") == 1 and "\\\\" not in msg


def test_measure_engine(tmp_path):
    assert measure("raw", size=1000) == {"required": 1024, "fully-allocated": 1024}
    m = measure("vhdx", size=64 * MiB, options={"block_size": "1M"})
    assert m["fully-allocated"] - m["required"] == 64 * MiB
    with pytest.raises(BlockDriverError, match="Either --size"):
        measure("vhdx")
    base, top = make_chain(tmp_path)
    m = measure("vhdx", filename=str(top), options={"block_size": "1M"})
    dst = tmp_path / "c.vhdx"
    blockdrv.convert(str(top), str(dst), fmt="vhdx", options={"block_size": "1M"})
    assert os.path.getsize(dst) <= m["required"] <= m["fully-allocated"]


# ------------------------------------------------------------ crash matrix

def _cfg(tmp, name, rules) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"rules": rules, "record": True}))
    return str(path)


def _rule(n, mode):
    unflushed, after = mode
    return [{"event": ["write", "flush"], "nth": n, "action": "crash",
             "unflushed": unflushed, "after_crash": after, "seed": n}]


def _run(op, tmp, top, base, where, rules):
    """Run ``op`` with blkdebug under ``where`` ("top" or "base");
    returns (finished, events counted there)."""
    cfg = _cfg(tmp, where, rules)
    opts = {}
    if where == "top":
        opts["file"] = {"driver": "blkdebug", "config": cfg}
    else:
        opts["backing"] = f"blkdebug:{cfg}:{base}"
    seen = {}
    real_open = blockdrv.block.open_node

    def spy(*a, **k):
        bs = real_open(*a, **k)
        try:
            seen.setdefault("state", blkdebug.state(bs))
        except BlockDriverError:
            pass
        return bs
    blockdrv.block.open_node = spy
    try:
        try:
            op(opts)
            finished = True
        except BlockDriverError:
            finished = False
    finally:
        blockdrv.block.open_node = real_open
    st = seen.get("state")
    return finished, (st.events if st is not None else 0), st


def _verify(top, base, want, what) -> list[str]:
    problems = []
    try:
        got = view(top)
        if got != want:
            problems.append(f"{what}: the top image reads differently")
    except BlockDriverError as exc:
        problems.append(f"{what}: top does not open: {exc}")
    for p in (top, base):
        try:
            with blockdrv.open_image(p) as img:
                res = img.check()
                if res.corruptions:
                    problems.append(f"{what}: {os.path.basename(p)} has corruptions")
        except BlockDriverError as exc:
            problems.append(f"{what}: {os.path.basename(p)}: {exc}")
    return problems


def _matrix(tmp_path, op_for, after_ok, label):
    base0, top0 = make_chain(tmp_path, seed=7)
    want = view(top0)
    work = tmp_path / "w"
    work.mkdir()
    base, top = work / "base.vhdx", work / "top.vhdx"
    totals = {}
    for where in ("top", "base"):
        shutil.copy(base0, base)
        shutil.copy(top0, top)
        ok, events, _ = _run(op_for(top), tmp_path, top, base, where, [])
        assert ok, f"{label}: the run without a crash failed"
        totals[where] = events
    tried = survived = 0
    problems = []
    for where, total in totals.items():
        for n in range(1, total + 1):
            mode = MODES[n % len(MODES)]
            shutil.copy(base0, base)
            shutil.copy(top0, top)
            finished, _, st = _run(op_for(top), tmp_path, top, base, where, _rule(n, mode))
            tried += 1
            what = f"{label} cut {where}#{n} {mode[0]}"
            found = _verify(top, base, want, what)
            if st is None or not st.crashed:
                found.append(f"{what}: the crash never fired")
            if finished and not found:
                found += after_ok(top, base, want, what)
            problems += found
            survived += not found
    print(f"\n{label}: {tried} cut points ({totals}), {survived} survived")
    assert not problems, "\n".join(problems[:10])
    assert tried == survived and tried >= 20


def test_crash_matrix_commit(tmp_path):
    def op_for(top):
        return lambda opts: commit(str(top), options=opts)

    def after_ok(top, base, want, what):
        return [] if view(base) == want else [f"{what}: finished but base differs"]
    _matrix(tmp_path, op_for, after_ok, "commit")


def test_crash_matrix_rebase(tmp_path):
    other = tmp_path / "w" / "other.vhdx"

    def op_for(top):
        if not other.exists():
            other.parent.mkdir(exist_ok=True)
            blockdrv.create_image(other, "vhdx", 8 * MiB, block_size="1M").close()
            with blockdrv.open_image(other, readonly=False) as img:
                img.write(3 * MiB, b"\x42" * (2 * MiB))
        return lambda opts: rebase(str(top), "other.vhdx", options=opts)

    def after_ok(top, base, want, what):
        with blockdrv.open_image(top) as img:
            ok = img.bs.backing.filename.endswith("other.vhdx")
        return [] if ok else [f"{what}: finished but still on the old parent"]
    _matrix(tmp_path, op_for, after_ok, "rebase")


def test_api_functions(tmp_path):
    from blockdrv import api
    base, top = make_chain(tmp_path)
    want = view(top)
    assert api.measure("raw", size="1M") == {"required": MiB, "fully-allocated": MiB}
    assert api.commit(top, drop=True).emptied is False
    assert view(base) == want and view(top) == want
    assert api.rebase(top, "base.vhdx", unsafe=True) == 0
    assert view(top) == want
