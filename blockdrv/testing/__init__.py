'''Test helpers for blockdrv and for authors of other format/protocol drivers.

Installing blockdrv registers a pytest plugin (entry point ``pytest11:
blockdrv`` -> :mod:`blockdrv.testing.plugin`), so a driver package's tests get
these fixtures without any conftest:

``qemu_img``, ``qemu_io``
    oracle paths; skip when missing, fail under ``CI=true``.  Tools of one
    format register where they are needed (``vhdiinfo``:
    ``from blockdrv.testing.vhdx.fixtures import vhdiinfo`` in a conftest).
``interop_tmp``, ``scratch``
    a fresh directory for images (``scratch``: on /dev/shm when there is one).
``replay_both``
    run one qemu-io script with qemu-io and with ``blockdrv io`` on two copies
    of one image; ``.assert_same()`` compares outputs, exit codes and files.
``figures``
    add tried/survived counts to the "reliability figures" terminal summary.

A format driver joins the format conformance suite with one subclass
(qemu-iotests' ``_supported_fmt``, fsspec's abstract tests), e.g. for a
hypothetical ``qcow2`` driver, in its tests::

    from blockdrv.testing.format_conformance import FormatConformance

    class TestQcow2(FormatConformance):
        format = "qcow2"
        create_options = {"cluster_size": "64k"}

and gets, for that variant: read/write/zero/discard/flush/block-status
semantics against a shadow model, reopen ro<->rw, persistence across close,
the crash matrix at every write/flush boundary through ``blkdebug``,
concurrent writers and readers through a suspending filter, and a seeded
fuzz campaign over mutated images (see the module for the hooks:
``make_image`` for a differencing variant, ``crash_plans``,
``crash_checks``, ``verify_allocation``, ``fuzz_regions``).  blockdrv's own
subclasses (raw; vhdx dynamic, fixed, 4K sectors, differencing) are in
tests/conformance/test_format_conformance.py.

A driver author's interop test::

    import pytest
    from blockdrv.testing.compare import register_normalizer, compare_guest
    from blockdrv.testing.qemu import random_script, qemu_img_check

    # what differs between two identical qemu runs of *your* format: here a
    # timestamp in the header and the footer's checksum
    def mask(data, start):
        data = bytearray(data)
        if start == 0:
            data[24:32] = bytes(8)
        else:
            data[-8:] = bytes(8)
        return bytes(data)

    register_normalizer("qcow2", mask, ranges=[(0, 512), (-512, None)])

    @pytest.mark.parametrize("seed", range(10))
    def test_same_script_same_file(replay_both, seed):
        script = random_script(seed, size=256 << 20, n=100)
        replay = replay_both(script, fmt="qcow2", size="256M")
        replay.assert_same()               # output, rc, normalized bytes
        assert qemu_img_check(replay.blockdrv_path, "qcow2")[0] == 0
        assert compare_guest(replay.qemu_path, replay.blockdrv_path) is None

An installed package registers its normalizer through an entry point
instead (``[project.entry-points."blockdrv.normalizers"] qcow2 =
"mypkg.testing:normalizer"``, naming a
:class:`~blockdrv.testing.compare.Normalizer`).  For a protocol driver, the
protocol conformance suite::

    from blockdrv.testing.conformance import ProtocolConformance

    class TestMyProtocol(ProtocolConformance):
        protocol = "myproto"
        def new_filename(self, tmp_path, name):
            return f"myproto:{tmp_path.name}-{name}"

Modules:

* :mod:`blockdrv.testing.format_conformance` -- ``FormatConformance``.
* :mod:`blockdrv.testing.conformance` -- ``ProtocolConformance``.
* :mod:`blockdrv.testing.crash` -- the crash-matrix engine for any format
  (``Plan``, ``plan_alloc``/``plan_overwrite``/``plan_inplace``,
  ``run_matrix``, ``verify_image``, ``MODES``) and ``abandon`` (drop a node
  graph as a dying process would).
* :mod:`blockdrv.testing.qemu` -- ``run_qemu_img``, ``run_qemu_io``,
  ``run_blockdrv_io`` (each -> ``(rc, stdout, stderr)``), ``qemu_img_create``,
  ``qemu_img_info`` / ``qemu_img_map`` / ``qemu_img_check`` (JSON),
  ``replay_script(commands, path, fmt, tool="qemu"|"blockdrv")`` ->
  ``ScriptResult`` (``.normalized``), ``random_script(seed, size, n, ...)``
  (seeded writes/zero writes/discards/pattern-verified reads/flushes, aligned
  and unaligned), ``sparse_copy``.
* :mod:`blockdrv.testing.scripts` -- ``verify_reads`` (``read -P`` commands
  for what a script wrote), ``run_blockdrv`` (the CLI in-process),
  ``guest_bytes``.
* :mod:`blockdrv.testing.compare` -- ``Normalizer``,
  ``register_normalizer(fmt, fn, ranges=...)`` (masks byte ranges anywhere
  in a file; raw: identity, built in; others from the ``blockdrv.normalizers``
  entry points), ``compare_files(a, b, fmt, extents=None|"all"|"payload")``
  (sparse-aware, first differing offset with hexdump context; ``extents``:
  the allocation maps must match too), ``compare_guest(a, b, fmt_a, fmt_b)``
  (streamed through blockdrv, skips ranges both report as zero),
  ``data_extents(path)``, ``file_digest(path, mtime=False)``.
* :mod:`blockdrv.testing.plugin` -- the fixtures above; ``Replay``.
* :mod:`blockdrv.testing.figures` -- ``record`` and the summary lines.
* :mod:`blockdrv.testing.tools` -- ``require_tool`` (skip on a laptop, fail in CI).
* :mod:`blockdrv.testing.vhdx` -- VHDX only: the normalizer and ``PosixFile``
  (``.normalize``), qemu-io scripts and dirty logs (``.scripts``), targeted
  corruption (``.corrupt``), crash workloads and checks (``.crash``), the
  conformance base classes (``.conformance``), the ``vhdiinfo`` fixture
  (``.fixtures``).
* :func:`blockdrv.cli.io.normalize_qemu_io_output` masks the timing figures of
  qemu-io's report lines so outputs compare.
'''
