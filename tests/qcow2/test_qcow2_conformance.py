"""qcow2 joins the format conformance suite (blockdrv.testing.format_conformance):
v3 with 64 KiB clusters, v2 with 4 KiB clusters, and v3 with 2-bit
refcounts (packed several to a byte).

Discards act on whole clusters only (as qemu's qcow2): a partly discarded
cluster keeps its data, so discarded bytes read as zeros or as before.
Crash plans and post-crash checks: qemu-img check must find no corruption
(leaks allowed) -- see tests/qcow2/test_qcow2_crash.py.
"""

from __future__ import annotations

from blockdrv.testing import crash
from blockdrv.testing.format_conformance import FormatConformance

from test_qcow2_crash import qemu_checks

MiB = 1 << 20


class _Qcow2(FormatConformance):
    format = "qcow2"
    discard_zeroes = None
    # the suite's unit stays 1 MiB (its concurrency workloads need at least
    # 96 KiB): MiB boundaries are cluster boundaries of every variant too

    def crash_plans(self):
        return [crash.plan_alloc(11, fmt="qcow2", create=self.create_options, size=8 * MiB,
                                 writes=8, name=f"{self.variant_name}: allocating"),
                crash.plan_overwrite(12, fmt="qcow2", create=self.create_options,
                                     name=f"{self.variant_name}: overwrites")]

    def crash_checks(self, bs, model, what, flags):
        return qemu_checks(bs, model, what, flags)


class TestQcow2(_Qcow2):
    variant_name = "qcow2 v3 64k"
    create_options = {"cluster_size": 65536}


class TestQcow2V2(_Qcow2):
    variant_name = "qcow2 v2 4k"
    create_options = {"cluster_size": 4096, "compat": "0.10"}


class TestQcow2Refcount2(_Qcow2):
    variant_name = "qcow2 4k refcount2"
    create_options = {"cluster_size": 4096, "refcount_bits": 2}

    def crash_plans(self):
        return [crash.plan_alloc(13, fmt="qcow2", create=self.create_options, size=4 * MiB,
                                 writes=5, name=f"{self.variant_name}: allocating")]
