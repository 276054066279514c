"""Crash-consistency matrix: the VHDX-only parts (issue 4, item 2).

The engine is :mod:`blockdrv.testing.crash` (every write/flush boundary of a
seeded plan, through ``blkdebug``, in three crash modes; the post-crash
image must open, check clean, hold every write acknowledged before the last
completed flush and no garbage).  The workloads every format runs --
allocating writes, overwrites, fixed images, 4 KiB sectors, differencing --
are part of the format conformance suite
(tests/conformance/test_format_conformance.py).  Here stay what only VHDX
has, checked with :func:`blockdrv.testing.vhdx.crash.vhdx_crash_checks` (log
replayed, no stray BAT entry):

* the log-wrap workload (400 allocations wrap the 1 MiB log three times):
  a window of cut points around every wrap, all of them with ``-m slow``;
* the resize workloads (grow in place, grow with BAT relocation, shrink,
  fixed grow): the image opens with the old or the new size;
* crashes during create;
* a sample of post-crash images through ``qemu-img check -r all`` (qemu
  replays our log) and ``qemu-img check`` after our replay;
* the checker itself: a driver that forgets a guest flush fails the matrix.
"""

from __future__ import annotations

import os

import pytest

import blockdrv
from blockdrv.block import open_protocol
from blockdrv.common import O_RDWR
from blockdrv.drivers.vhdx.create import create_vhdx
from blockdrv.errors import BlockDriverError
from blockdrv.plugins import get_registry
from blockdrv.protocols import blkdebug
from blockdrv.testing.crash import (MODES, SECTION, MiB, all_modes, crash_rule, every_cut,
                                    plan_overwrite, rotate_modes)
from blockdrv.testing.crash import run_matrix as _run_matrix
from blockdrv.testing.qemu import QEMU_IMG
from blockdrv.testing.tools import require_tool
from blockdrv.testing.vhdx.crash import (plan_resize_fixed, plan_resize_grow,
                                         plan_resize_relocate, plan_resize_shrink, plan_wrap,
                                         vhdx_crash_checks, wrap_windows)


def run_matrix(*args, **kwargs):
    return _run_matrix(*args, extra_checks=vhdx_crash_checks, **kwargs)


def test_crash_matrix_log_wrap_fast(scratch, figures):
    run_matrix(scratch, plan_wrap(), wrap_windows(MiB, window=3, stride=400),
               rotate_modes, figures)


@pytest.mark.slow
def test_crash_matrix_log_wrap_full(scratch, figures):
    run_matrix(scratch, plan_wrap(), every_cut, rotate_modes, figures,
               label="log wrap x3 (full)")


def test_crash_images_pass_qemu_img_check(scratch, figures):
    qemu_img = require_tool(QEMU_IMG)
    plan = plan_overwrite(seed=7)
    run_matrix(scratch, plan, lambda total, trace: range(1, total + 2, 4), rotate_modes,
               figures, label="overwrites + qemu-img check", qemu_img=qemu_img, qemu_every=3)


# --- create ----------------------------------------------------------------

def _create_through(path: str, config: dict, **opts):
    bs = open_protocol(path, O_RDWR, {"driver": "blkdebug", "config": config,
                                      "image": {"create": True}})
    bs.growable = True                  # as block.create_file does
    st = blkdebug.state(bs)
    try:
        create_vhdx(bs, 8 * MiB, block_size=MiB, log_size=MiB, **opts)
    except BlockDriverError:
        if not st.crashed:
            raise
    finally:
        try:
            bs.close()
        except BlockDriverError:
            if not st.crashed:
                raise
    return st


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_crash_during_create(subformat, scratch, figures):
    """A crash while creating leaves either an image that fails to open with
    a clean error, or a valid empty image; once create's final flush is done,
    the image must open."""
    path = os.path.join(scratch, "create.vhdx")
    st = _create_through(path, {"rules": []}, subformat=subformat)
    total = st.events
    tried = survived = 0
    failures = []
    for n in range(1, total + 2):
        for mode in MODES:
            os.unlink(path) if os.path.exists(path) else None
            st = _create_through(path, crash_rule(n, mode), subformat=subformat)
            tried += 1
            try:
                with blockdrv.open_image(path, "vhdx") as img:
                    res = img.check()
                    ok = res.corruptions == 0 and img.size == 8 * MiB
                    ok = ok and img.read(0, MiB) == bytes(MiB)
                    ok = ok and img.read(7 * MiB, MiB) == bytes(MiB)
                    if not ok:
                        failures.append(f"cut {n} {mode}: opens but is not a valid empty image")
            except BlockDriverError as exc:
                if n > total:
                    failures.append(f"completed create does not open: {exc}")
            else:
                with blockdrv.open_image(path, "vhdx", readonly=False) as img:
                    img.write(0, b"x" * 4096)
                    img.flush()
                    if img.read(0, 4096) != b"x" * 4096:
                        failures.append(f"cut {n} {mode}: created image does not take writes")
            if not failures or failures[-1].split(":")[0] != f"cut {n} {mode}":
                survived += 1
    figures(SECTION, f"create ({subformat})", tried=tried, survived=survived, events=total)
    print(f"\n[crash matrix] create ({subformat}): {tried} cut points tried, "
          f"{survived} survived")
    assert not failures, failures[:10]


def test_matrix_catches_a_lost_flush(scratch, figures, monkeypatch):
    """The checker itself: a driver whose guest flush never reaches the disk
    must fail the matrix (in-place overwrites are lost with the cache)."""
    from blockdrv.node import BlockDriverState
    real = BlockDriverState.co_flush

    async def vhdx_flush_forgotten(self):
        if self.drv.name == "vhdx":
            return
        await real(self)

    monkeypatch.setattr(BlockDriverState, "co_flush", vhdx_flush_forgotten)
    with pytest.raises(AssertionError, match="lost a flushed write"):
        run_matrix(scratch, plan_overwrite(), every_cut, lambda n: [("lose", "drop")],
                   lambda *a, **k: None)


# --- resize ----------------------------------------------------------------

RESIZE_PLANS = [plan_resize_grow, plan_resize_relocate, plan_resize_shrink, plan_resize_fixed]
RESIZE_IDS = ["grow", "relocate", "shrink", "fixed-grow"]


def test_resize_workload_is_wired():
    assert get_registry().format("vhdx").bdrv_co_truncate is not None


@pytest.mark.parametrize("make", RESIZE_PLANS, ids=RESIZE_IDS)
def test_crash_matrix_resize(make, scratch, figures):
    """Every cut point of a workload with one resize: the image opens with
    the old or the new size (never older than a returned resize), data intact."""
    run_matrix(scratch, make(), every_cut, rotate_modes, figures)


@pytest.mark.slow
@pytest.mark.parametrize("make", RESIZE_PLANS, ids=RESIZE_IDS)
def test_crash_matrix_resize_full(make, scratch, figures):
    run_matrix(scratch, make(), every_cut, all_modes, figures, label=make().name + " (full)")


def test_resize_crash_images_pass_qemu_img_check(scratch, figures):
    qemu_img = require_tool(QEMU_IMG)
    run_matrix(scratch, plan_resize_relocate(seed=11),
               lambda total, trace: range(1, total + 2, 2), rotate_modes, figures,
               label="resize relocate + qemu-img check", qemu_img=qemu_img, qemu_every=2)


# --- discard and compact (issue 14) ------------------------------------------

from blockdrv.testing.vhdx.crash import plan_compact, plan_discard  # noqa: E402

SPACE_PLANS = [plan_discard, plan_compact]
SPACE_IDS = ["discard", "compact"]


@pytest.mark.parametrize("make", SPACE_PLANS, ids=SPACE_IDS)
def test_crash_matrix_discard_compact(make, scratch, figures):
    """Every cut point: discarded ranges read zeros or (unflushed) their old
    data, reused blocks never show another block's bytes, a compaction cut
    anywhere leaves every block on its old or its new copy."""
    run_matrix(scratch, make(), every_cut, rotate_modes, figures)


@pytest.mark.slow
@pytest.mark.parametrize("make", SPACE_PLANS, ids=SPACE_IDS)
def test_crash_matrix_discard_compact_full(make, scratch, figures):
    run_matrix(scratch, make(), every_cut, all_modes, figures, label=make().name + " (full)")


@pytest.mark.parametrize("make", SPACE_PLANS, ids=SPACE_IDS)
def test_discard_compact_crash_images_pass_qemu_img_check(make, scratch, figures):
    qemu_img = require_tool(QEMU_IMG)
    run_matrix(scratch, make(), lambda total, trace: range(1, total + 2, 3), rotate_modes,
               figures, label=make().name + " + qemu-img check", qemu_img=qemu_img,
               qemu_every=2)
