"""VHDX-specific test helpers (the generic harness lives one level up).

* :mod:`.normalize` -- :func:`normalize_vhdx`, :func:`structure_end`, and
  :data:`normalizer`, the format's :class:`~blockdrv.testing.compare.Normalizer`
  (registered through the ``blockdrv.normalizers`` entry point);
  :class:`PosixFile`, the node interface over a host file.
* :mod:`.scripts` -- VHDX qemu-io scripts (``edge_script``, ``log_wrap_script``),
  qemu-made dirty logs (``make_dirty``, ``dirty_log_case``), ``current_header``,
  ``log_sequences``, ``vhdiinfo_fields``.
* :mod:`.corrupt` -- ``Vhdx``: one targeted mutation of a valid image
  (checksums re-sealed); ``make_dirty_log``.
* :mod:`.crash` -- the VHDX crash-matrix workloads (log wrap, resize) and the
  post-crash checks only VHDX has (no stray BAT entry, log replayed).
* :mod:`.fixtures` -- the ``vhdiinfo`` fixture, for the conftest of the tests
  that need it (the global pytest plugin does not register it).
* :mod:`.conformance` -- :class:`VhdxConformance`, the format conformance suite
  with VHDX's allocation checks; subclassed once per variant.
"""

from .normalize import PosixFile, normalize_vhdx, normalizer, structure_end

__all__ = ["PosixFile", "normalize_vhdx", "normalizer", "structure_end"]
