"""Test helpers for blockdrv and for authors of other format drivers.

* :mod:`blockdrv.testing.tools` -- locating qemu-img/qemu-io (skip on a
  laptop without them, fail under ``CI=true``).
* :mod:`blockdrv.testing.vhdx` -- the VHDX normalizer for byte comparisons.
"""
