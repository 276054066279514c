"""An NBD server for blockdrv nodes (``blockdrv nbd``).

* :mod:`.protocol` -- the wire format of the NBD standard (constants and
  packing helpers, no I/O);
* :mod:`.export`   -- what one export offers: size, transmission flags, meta
  contexts, and the NBD commands mapped onto the node's ``co_*`` methods;
* :mod:`.server`   -- the asyncio server: listening socket, connection limit,
  the handshake and the pipelined transmission phase of each client;
* :mod:`.tls`      -- ``tls-creds-x509`` objects as Python ``ssl`` contexts.
"""

__all__ = ["Export", "ExportOptions", "NBDServer"]


def __getattr__(name: str):
    # Lazily: the nbd protocol driver imports .protocol at every start-up,
    # and the server's asyncio alone costs ~60 ms a short command never needs.
    if name in ("Export", "ExportOptions"):
        from . import export
        return getattr(export, name)
    if name == "NBDServer":
        from .server import NBDServer
        return NBDServer
    raise AttributeError(name)
