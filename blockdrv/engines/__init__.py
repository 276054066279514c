"""The engines behind the commands, as library functions.

Each engine is what qemu-img.c's ``img_<command>`` does once its options
are parsed: it opens the images, does the work and reports through return
values and :mod:`blockdrv.errors` exceptions -- it never prints and never
exits, so the CLI (:mod:`blockdrv.cli`) is only parsing and printing, and
:mod:`blockdrv.api` hands the same engines to Python callers.

* :mod:`.convert` -- ``img_convert``: copy one or more images into a new one,
  sparse, with ``-m N`` concurrent requests (:class:`~.convert.ImgConvertState`);
* :mod:`.compare` -- ``img_compare``: the first offset where two images differ;
* :mod:`.check`   -- ``img_check``: consistency check and repair, with the
  double check after a repair.

commit, rebase and measure will join them here.  Submodules are imported on
use: the CLI's start-up pays only for the command it runs.
"""
