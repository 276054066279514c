'''Test helpers for blockdrv and for authors of other format/protocol drivers.

Installing blockdrv registers a pytest plugin (entry point ``pytest11:
blockdrv`` -> :mod:`blockdrv.testing.plugin`), so a driver package's tests get
these fixtures without any conftest:

``qemu_img``, ``qemu_io``, ``vhdiinfo``
    oracle paths; skip when missing, fail under ``CI=true``.
``interop_tmp``
    a fresh directory for images.
``replay_both``
    run one qemu-io script with qemu-io and with ``blockdrv io`` on two copies
    of one image; ``.assert_same()`` compares outputs, exit codes and files.

A driver author's interop test, for a hypothetical ``qcow2`` driver::

    import pytest
    from blockdrv.testing.compare import register_normalizer, compare_guest
    from blockdrv.testing.qemu import random_script, qemu_img_check

    # what differs between two identical qemu runs of *your* format
    register_normalizer("qcow2", lambda head: head, prefix=64 * 1024)

    @pytest.mark.parametrize("seed", range(10))
    def test_same_script_same_file(replay_both, seed):
        script = random_script(seed, size=256 << 20, n=100)
        replay = replay_both(script, fmt="qcow2", size="256M")
        replay.assert_same()               # output, rc, normalized bytes
        assert qemu_img_check(replay.blockdrv_path, "qcow2")[0] == 0
        assert compare_guest(replay.qemu_path, replay.blockdrv_path) is None

and for a protocol driver, the conformance suite::

    from blockdrv.testing.conformance import ProtocolConformance

    class TestMyProtocol(ProtocolConformance):
        protocol = "myproto"
        def new_filename(self, tmp_path, name):
            return f"myproto:{tmp_path.name}-{name}"

Modules:

* :mod:`blockdrv.testing.qemu` -- ``run_qemu_img``, ``run_qemu_io``,
  ``run_blockdrv_io`` (each -> ``(rc, stdout, stderr)``), ``qemu_img_create``,
  ``qemu_img_info`` / ``qemu_img_map`` / ``qemu_img_check`` (JSON),
  ``replay_script(commands, path, fmt, tool="qemu"|"blockdrv")`` ->
  ``ScriptResult`` (``.normalized``), ``random_script(seed, size, n, ...)``
  (seeded writes/zero writes/discards/pattern-verified reads/flushes, aligned
  and unaligned), ``sparse_copy``.
* :mod:`blockdrv.testing.compare` -- ``register_normalizer(fmt, fn, prefix)``
  (raw: identity; vhdx: ``blockdrv.testing.vhdx.normalize_vhdx``, looked up
  lazily), ``compare_files(a, b, fmt, extents=None|"all"|"payload")``
  (sparse-aware, first differing offset with hexdump context; ``extents``:
  the allocation maps must match too), ``compare_guest(a, b, fmt_a, fmt_b)``
  (streamed through blockdrv, skips ranges both report as zero),
  ``data_extents(path)``, ``file_digest(path, mtime=False)``.
* :mod:`blockdrv.testing.conformance` -- ``ProtocolConformance``.
* :mod:`blockdrv.testing.plugin` -- the fixtures above; ``Replay``.
* :mod:`blockdrv.testing.tools` -- ``require_tool`` (skip on a laptop, fail in CI).
* :mod:`blockdrv.testing.vhdx` -- the VHDX normalizer; ``PosixFile``.
* :mod:`blockdrv.testing.vhdx_scripts` -- VHDX qemu-io scripts, ``verify_reads``,
  qemu-made dirty logs (``make_dirty``, ``dirty_log_case``), ``run_blockdrv``,
  ``vhdiinfo_fields``.
* :mod:`blockdrv.testing.vhdx_corrupt` -- ``Vhdx``: one targeted mutation of a
  valid image (checksums re-sealed); ``make_dirty_log``.
* :func:`blockdrv.cli.io.normalize_qemu_io_output` masks the timing figures of
  qemu-io's report lines so outputs compare.
'''
