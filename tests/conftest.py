"""Fixtures of the whole suite come from :mod:`blockdrv.testing.plugin`
(``qemu_img``, ``qemu_io``, ``interop_tmp``, ``replay_both``, ``figures``,
``scratch``), which pytest loads through the ``pytest11`` entry point of the
installed package; the VHDX normalizer comes from the ``blockdrv.normalizers``
entry point.  From a source tree whose installed metadata predates either
entry point, both are registered here instead.
"""

import blockdrv.testing.plugin as _plugin
from blockdrv.testing import compare as _compare


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "blockdrv-testing")
    if not _compare.normalizer_registered("vhdx"):
        from blockdrv.testing.vhdx import normalizer
        _compare.register_normalizer("vhdx", normalizer)
