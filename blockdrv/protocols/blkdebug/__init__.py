"""``blkdebug``: a fault-injection filter in the spirit of QEMU's blkdebug.

A ``blkdebug`` node sits between a format node and the real protocol node and
passes every request through to its ``file`` child, counting events and
firing rules::

    vhdx --file--> blkdebug --file--> file

Selecting it
------------

* by filename, as QEMU: ``blkdebug:CONFIG:PATH`` where ``CONFIG`` is the path
  of an INI or JSON rule file (may be empty: ``blkdebug::disk.vhdx``) and
  ``PATH`` any filename the child understands (``memory:x`` too);
* by options: ``open_node(path, "vhdx", flags, options={"file": {"driver":
  "blkdebug", "config": CONFIG, "image": {...child options...}}})`` where
  ``CONFIG`` is a dict (below) or the path of a rule file.

Configuration (dict or JSON)::

    {"rules": [RULE, ...],
     "cache": "writethrough" | "volatile",   # volatile: buffer unflushed writes
     "suspend": false,                       # await asyncio.sleep(0) around I/O
     "record": false}                        # keep a trace of writes/flushes

    RULE = {"event": "write" | "read" | "flush" | "truncate" | "discard"
                     | ["write", "flush", ...],   # several kinds, counted together
            "nth": N,                 # fire on the Nth matching event (1-based);
                                      # absent: on every matching event
            "offset": O, "length": L, # only requests touching [O, O+L)
            "action": "error" | "crash",
            "once": false,            # error: fire once, or on every match from nth on
            "errno": 5 | "EIO",       # error: the errno raised (default EIO)
            "after_crash": "drop" | "fail",   # crash: later writes/flushes silently
                                              # succeed, or fail with EIO
            "unflushed": "keep" | "lose" | "random",
                                      # crash: the writes since the last completed
                                      # flush all reach the medium, none do, or a
                                      # seeded random subset does
            "seed": 0, "keep_probability": 0.5}

The INI form (``.ini``/``.conf``, or any file not starting with ``{``) has one
section per rule, named after its action, plus an optional ``[blkdebug]``
section for the global keys; lists are comma separated, booleans on/off::

    [blkdebug]
    cache = volatile

    [inject-error]
    event = write
    nth = 3
    errno = ENOSPC
    once = on

    [crash]
    event = write, flush
    nth = 10
    unflushed = random
    seed = 7

Semantics
---------

Every event (read, write -- including write-zeroes --, flush, truncate,
discard) increments its counter and is matched against the rules in order;
the first rule that fires decides.  A *crash* models a power loss just before
the event: the event itself and every later write, flush, truncate and
discard never reach the child.  With ``unflushed`` other than ``keep`` (or
``cache = volatile``), writes are buffered in the filter until a flush --
reads see them -- and the crash applies only the kept subset, in order, as a
volatile write cache losing power would.  A write with ``WRITE_FUA`` is
durable at once.  A closed, never-crashed node writes back its buffer.

Inspect a node with :func:`state` (``BlkdebugState``): ``counters``
(``reads``, ``writes``, ``flushes``, ...), ``events`` (writes + flushes: the
cut points of a crash matrix), ``crashed``, ``crash_event``, ``kept_writes``,
``lost_writes``, ``errors_injected`` and, with ``record``, ``trace``.

Layout
------

* :mod:`.rules`  -- one rule: its keys, and which events it matches
* :mod:`.config` -- the configuration: dict, JSON/INI file, ``blkdebug:`` filename
* :mod:`.events` -- per-node state: counting, firing rules, the crash and the
  volatile cache
* :mod:`.filter` -- the filter driver and its hooks
"""

from .config import Config, load_config_file, parse_config, parse_ini, split_filename
from .events import BlkdebugState, state
from .filter import BlkdebugFilter, driver
from .rules import ACTIONS, EVENTS, Rule

__all__ = [
    "ACTIONS", "EVENTS", "BlkdebugFilter", "BlkdebugState", "Config", "Rule", "driver",
    "load_config_file", "parse_config", "parse_ini", "split_filename", "state",
]
