"""An NBD server for blockdrv nodes (``blockdrv nbd``).

* :mod:`.protocol` -- the wire format of the NBD standard (constants and
  packing helpers, no I/O);
* :mod:`.export`   -- what one export offers: size, transmission flags, meta
  contexts, and the NBD commands mapped onto the node's ``co_*`` methods;
* :mod:`.server`   -- the asyncio server: listening socket, connection limit,
  the handshake and the pipelined transmission phase of each client;
* :mod:`.tls`      -- ``tls-creds-x509`` objects as Python ``ssl`` contexts.
"""

from .export import Export, ExportOptions
from .server import NBDServer

__all__ = ["Export", "ExportOptions", "NBDServer"]
