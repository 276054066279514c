"""The VHD driver joins blockdrv's format conformance suite: one subclass
per variant, the inherited tests (semantics against a shadow model, reopen,
the crash matrix through blkdebug, concurrency, fuzzing) run for each."""

from blockdrv.testing.format_conformance import FormatConformance


class TestVpcDynamic(FormatConformance):
    variant_name = "vpc dynamic"
    format = "vpc"
    create_options = {"subformat": "dynamic", "force_size": True}   # exact sizes
    cluster_size = 2 << 20          # the VHD block
    discard_zeroes = False          # as qemu's vpc: discards are dropped


class TestVpcFixed(FormatConformance):
    variant_name = "vpc fixed"
    format = "vpc"
    create_options = {"subformat": "fixed", "force_size": True}
    discard_zeroes = False
