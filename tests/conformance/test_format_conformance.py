"""The format conformance suite (:mod:`blockdrv.testing.format_conformance`)
for every built-in format and variant; a driver outside blockdrv joins the
same way, with one subclass."""

from blockdrv.testing.crash import plan_alloc, plan_inplace, plan_overwrite
from blockdrv.testing.format_conformance import FormatConformance
from blockdrv.testing.vhdx.conformance import VhdxConformance, VhdxDifferencingConformance
from blockdrv.testing.vhdx.crash import plan_discard

MiB = 1 << 20


class TestRaw(FormatConformance):
    variant_name = "raw"
    format = "raw"
    discard_zeroes = None          # passed to the file: a hole where the host punches one


class TestVhdxDynamic(VhdxConformance):
    variant_name = "vhdx dynamic"
    create_options = {"block_size": MiB, "log_size": MiB}

    def crash_plans(self):
        # the workloads of the original VHDX crash matrix, figures unchanged
        return [plan_alloc(1), plan_overwrite(2)]


class TestVhdxFixed(VhdxConformance):
    variant_name = "vhdx fixed"
    create_options = {"subformat": "fixed", "block_size": MiB, "log_size": MiB}

    def crash_plans(self):
        fixed = {"subformat": "fixed", "block_size": MiB, "log_size": MiB}
        return [plan_inplace(3, create={**fixed, "block_state_zero": False}, name="fixed"),
                plan_inplace(3, create={**fixed, "block_state_zero": True},
                             name="fixed (ZERO-state BAT)")]


class TestVhdx4K(VhdxConformance):
    variant_name = "vhdx 4K"
    create_options = {"block_size": MiB, "log_size": MiB, "logical_sector_size": 4096}

    def crash_plans(self):
        return [plan_alloc(5, lss=4096)]


class TestVhdxDifferencing(VhdxDifferencingConformance):
    variant_name = "vhdx differencing"
    create_options = {"block_size": MiB, "log_size": MiB}

    def crash_plans(self):
        return [plan_alloc(1, create=dict(self.create_options),
                           name="allocating writes over a parent"),
                plan_overwrite(2, create=dict(self.create_options),
                               name="overwrites over a parent")]


class _ExplicitUnmap:
    """Opened with an explicit discard=unmap: discards and unmapping zero
    writes become block states (UNMAPPED/ZERO), partial blocks are zeroed
    (whole sectors only: the sub-sector edges of a discard keep their data,
    as a discard allows; tests/unit/vhdx/test_discard.py checks the zeros)."""

    discard_zeroes = None

    def open(self, path, readonly: bool = True):
        import blockdrv
        return blockdrv.open_image(path, self.format, readonly=readonly, discard="unmap")



class TestVhdxDynamicUnmap(_ExplicitUnmap, VhdxConformance):
    variant_name = "vhdx dynamic, discard=unmap"
    create_options = {"block_size": MiB, "log_size": MiB}

    def crash_plans(self):
        # discards journaled to UNMAPPED, partial zeroing, reuse of freed blocks
        return [plan_discard()]


class TestVhdxDifferencingUnmap(_ExplicitUnmap, VhdxDifferencingConformance):
    variant_name = "vhdx differencing, discard=unmap"
    create_options = {"block_size": MiB, "log_size": MiB}
    # crash plans: the differencing ones (writes over a parent), inherited
