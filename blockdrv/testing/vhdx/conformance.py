"""The format conformance suite for VHDX: :class:`VhdxConformance` adds the
checks only VHDX can make (BAT after a crash and after concurrent
allocations); tests/conformance/test_vhdx_conformance.py subclasses it once
per variant (dynamic, fixed, 4 KiB sectors, differencing)."""

from __future__ import annotations

import os

import numpy as np

import blockdrv

from ..format_conformance import FormatConformance
from .crash import FULLY_PRESENT, vhdx_crash_checks

MiB = 1 << 20


class VhdxConformance(FormatConformance):
    format = "vhdx"
    create_options = {"block_size": MiB, "log_size": MiB}
    cluster_size = MiB

    def crash_checks(self, bs, model, what, flags):
        return vhdx_crash_checks(bs, model, what, flags)

    def verify_allocation(self, bs, clusters):
        """Every written block allocated once, at its own offset, and the file
        grew by exactly one block per allocated block."""
        if self.create_options.get("subformat") == "fixed":
            return
        img = bs.opaque
        states = img.bat.states()
        present = np.flatnonzero(states == FULLY_PRESENT)
        offsets = img.bat.offsets()[present]
        assert len(set(offsets.tolist())) == len(offsets), "a block was allocated twice"
        # with 1 MiB blocks and 512-byte sectors a chunk holds 2048 blocks:
        # payload BAT indices are block numbers for these small disks
        assert set(present.tolist()) <= clusters, \
            f"blocks allocated that nobody wrote: {sorted(set(present.tolist()) - clusters)}"
        if not self.is_differencing:
            assert set(present.tolist()) == clusters
            data_start = min(offsets.tolist()) if len(offsets) else 0
            assert bs.file.getlength() == data_start + len(present) * MiB, \
                "file length does not match the allocated blocks"

    is_differencing = False


class VhdxDifferencingConformance(VhdxConformance):
    """A child over a parent holding data in every other MiB: reads fall
    through, writes and zero writes must hide the parent's data."""

    is_differencing = True
    fresh_reads_zero = False
    parent_options = {"block_size": MiB, "log_size": MiB}

    def make_image(self, path, size, **options):
        parent = os.path.splitext(path)[0] + "-parent.vhdx"
        with blockdrv.create_image(parent, "vhdx", size, **self.parent_options) as img:
            for mib in range(0, size // MiB, 2):
                img.write(mib * MiB + 1024, bytes([0x50 + mib % 64]) * (64 * 1024))
            img.write(size - 4096, b"\xaa" * 4096)
        blockdrv.create_image(path, "vhdx", backing_file=os.path.basename(parent),
                              backing_fmt="vhdx", **options).close()


__all__ = ["VhdxConformance", "VhdxDifferencingConformance"]
