"""Interop fixtures (``qemu_img``, ``qemu_io``, ``vhdiinfo``, ``interop_tmp``,
``replay_both``) come from :mod:`blockdrv.testing.plugin`, which pytest loads
through the ``pytest11`` entry point of the installed package.  From a source
tree whose metadata predates that entry point, register it here instead.
"""

import blockdrv.testing.plugin as _plugin


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "blockdrv-testing")
