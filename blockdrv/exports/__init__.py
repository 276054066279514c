"""Exporting an open node to other programs.

:mod:`blockdrv.exports.nbd` serves a node over the Network Block Device
protocol (``blockdrv nbd``, blockdrv's qemu-nbd).  An export only talks to the
node's ``co_*`` methods, so every format and protocol driver is served alike.
"""
