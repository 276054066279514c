"""The plugin manager: drivers found by entry point, bound per node.

Every driver, the built-in ones included, is declared in the entry-point
group ``blockdrv.drivers``; a third-party driver is a package with one such
entry point naming an object (or a class, instantiated without arguments)
that carries ``format_name``/``protocol_name`` and hook implementations.
"""

from __future__ import annotations

import os
import sys
from _thread import allocate_lock
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Callable

from . import hookspecs
from ._startup import argnames, import_machinery
from .errors import InvalidArgumentError, UnsupportedError

ENTRY_POINT_GROUP = "blockdrv.drivers"
# Light format probes, "name = module:callable(buf, filename) -> score": the
# registry calls them instead of importing every driver to probe an image.
PROBE_GROUP = "blockdrv.probes"

# Built-ins, used only when the package metadata is unavailable (running from
# a source tree that was never installed); an installed blockdrv finds the very
# same objects through its entry points.
_BUILTIN = {
    "file": "blockdrv.protocols.file:driver",
    "memory": "blockdrv.protocols.memory:driver",
    "blkdebug": "blockdrv.protocols.blkdebug:driver",
    "nbd": "blockdrv.protocols.nbd:driver",
    "fsspec": "blockdrv.protocols.fsspec:driver",
    "raw": "blockdrv.drivers.raw:driver",
    "vhdx": "blockdrv.drivers.vhdx:driver",
    "qcow2": "blockdrv.drivers.qcow2:driver",
}

_BOUND_HOOKS = (
    "bdrv_open", "bdrv_close", "bdrv_reopen_prepare", "bdrv_reopen_commit",
    "bdrv_reopen_abort", "bdrv_co_readv", "bdrv_co_writev", "bdrv_co_pwritev_compressed",
    "bdrv_co_flush",
    "bdrv_co_pwrite_zeroes", "bdrv_co_pdiscard", "bdrv_co_block_status",
    "bdrv_co_truncate", "bdrv_create", "bdrv_create_opts", "bdrv_get_info",
    "bdrv_check", "bdrv_has_zero_init", "bdrv_get_allocated_file_size",
    "bdrv_probe", "bdrv_check_backing", "bdrv_child_perm", "bdrv_check_perm", "bdrv_set_perm",
    "bdrv_abort_perm_update", "bdrv_make_empty", "bdrv_change_backing_file", "bdrv_measure",
    "bdrv_snapshot_list",
)


class BoundDriver:
    """One driver's hook implementations, resolved once.

    Attributes named after the hooks hold the implementation function, or
    ``None`` when the driver lacks it -- the driver's capabilities.  Calling
    them is a plain Python call: per-I/O dispatch costs no plugin lookup.
    """

    def __init__(self, plugin: Any, impls: dict[str, Callable]) -> None:
        self.plugin = plugin
        self.format_name: str | None = getattr(plugin, "format_name", None)
        self.protocol_name: str | None = getattr(plugin, "protocol_name", None)
        self.name = self.format_name or self.protocol_name or repr(plugin)
        for hook in _BOUND_HOOKS:
            setattr(self, hook, impls.get(hook))

    def has(self, hook: str) -> bool:
        return getattr(self, hook, None) is not None

    def create_opts(self):
        if self.bdrv_create_opts is not None:
            return list(self.bdrv_create_opts())
        return list(getattr(self.plugin, "create_opts", None) or [])

    def __repr__(self) -> str:
        return f"<BoundDriver {self.name}>"


def _positional(func: Callable, impl_args: tuple[str, ...],
                spec_args: tuple[str, ...]) -> Callable:
    """A function taking the hookspec's arguments positionally.

    pluggy lets an implementation accept a subset of the spec's arguments; the
    common case (all of them, in order) is returned as is, the rest wrapped.
    """
    if tuple(impl_args) == tuple(spec_args):
        return func
    wanted = [i for i, name in enumerate(spec_args) if name in impl_args]
    names = [spec_args[i] for i in wanted]

    def call(*args, **kwargs):
        given = dict(zip(spec_args, args))
        given.update(kwargs)
        return func(**{name: given[name] for name in names if name in given})

    call.__name__ = getattr(func, "__name__", "hookimpl")
    return call


_spec_args: dict[str, tuple[str, ...]] = {}


def spec_args() -> dict[str, tuple[str, ...]]:
    """hook name -> the arguments of its hookspec (read once)."""
    if not _spec_args:
        for name, obj in vars(hookspecs).items():
            if isinstance(getattr(obj, "blockdrv_spec", None), dict):
                _spec_args[name] = argnames(obj)
    return _spec_args


def _invalid(plugin: Any, message: str) -> Exception:
    import pluggy               # its error type, for callers that catch it
    return pluggy.PluginValidationError(plugin, message)


class DriverRegistry:
    """The drivers, by format and protocol name, each bound once.

    Binding reads the hook implementations' markers and argument names
    itself and checks them as pluggy's ``register`` does (an argument the
    hookspec does not have is refused); pluggy's ``PluginManager`` -- which
    costs the ``inspect`` module and a signature per hook at start-up -- is
    :attr:`pm`, built over every registered driver when first used.
    """

    def __init__(self) -> None:
        self._pm = None
        self._plugins: dict[str, Any] = {}      # pluggy name -> plugin, in order
        self.formats: dict[str, BoundDriver] = _Table(self)
        self.protocols: dict[str, BoundDriver] = _Table(self)
        # entry points not imported yet, in declaration order: name -> value
        self._pending: dict[str, str] = {}
        # every entry point and explicitly registered driver, in order (the
        # probe's tie-break): name -> BoundDriver once loaded, else None
        self._order: dict[str, BoundDriver | None] = {}
        self._light: dict[str, str] = {}      # name -> light probe ("module:attr")

    def register(self, plugin: Any, name: str | None = None, *,
                 key_hint: str | None = None) -> BoundDriver:
        if isinstance(plugin, type):
            plugin = plugin()
        fmt = getattr(plugin, "format_name", None)
        proto = getattr(plugin, "protocol_name", None)
        if not fmt and not proto:
            raise TypeError(f"driver {plugin!r} has neither format_name nor protocol_name")
        key = name or f"{'format' if fmt else 'protocol'}:{fmt or proto}"
        if key in self._plugins:
            return (dict.get(self.formats, fmt) if fmt else None) \
                or dict.__getitem__(self.protocols, proto)
        bound = self._bind(plugin)
        if self._pm is not None:
            self._pm.register(plugin, name=key)
        self._plugins[key] = plugin
        if fmt:
            dict.__setitem__(self.formats, fmt, bound)
        if proto:
            dict.__setitem__(self.protocols, proto, bound)
        if key_hint is None and bound.name not in self._order:
            self._order[bound.name] = bound
        return bound

    @property
    def pm(self):
        """pluggy's ``PluginManager`` over the hookspecs and every driver
        registered so far (and later), built on first use."""
        if self._pm is None:
            import pluggy
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for key, plugin in self._plugins.items():
                pm.register(plugin, name=key)
            self._pm = pm
        return self._pm

    def _bind(self, plugin: Any) -> BoundDriver:
        """The plugin's hook implementations (``blockdrv_impl`` markers),
        checked against the hookspecs as pluggy checks them."""
        specs = spec_args()
        impls: dict[str, Callable] = {}
        for attr in dir(plugin):
            if attr.startswith("__"):
                continue
            func = getattr(plugin, attr, None)
            opts = getattr(func, "blockdrv_impl", None) if callable(func) else None
            if not isinstance(opts, dict):
                continue
            hook = opts.get("specname") or attr
            spec = specs.get(hook)
            if spec is None:
                continue        # no such hook: pluggy keeps it unverified too
            names = argnames(func)
            extra = [n for n in names if n not in spec]
            if extra:
                raise _invalid(plugin, f"Plugin {plugin!r} for hook {hook!r}\n"
                               f"hookimpl definition: {attr}{names}\n"
                               f"Argument(s) {set(extra)} are declared in the hookimpl "
                               "but can not be found in the hookspec")
            if hook in _BOUND_HOOKS:
                impls[hook] = _positional(func, names, spec)
        return BoundDriver(plugin, impls)

    def load_entry_points(self) -> None:
        """Learn the drivers' entry points, importing none of them: a driver
        module is imported when its name is first looked up (see
        :mod:`blockdrv._lazy`)."""
        from ._lazy import BUILTIN_PROBES
        found = [(n, v) for n, v in entry_points(ENTRY_POINT_GROUP)]
        found += [(n, v) for n, v in _BUILTIN.items()]
        for name, value in found:
            if name in self._order or dict.__contains__(self.formats, name) \
                    or dict.__contains__(self.protocols, name):
                continue
            self._order[name] = None
            self._pending[name] = value
        light = dict(BUILTIN_PROBES)
        light.update(entry_points(PROBE_GROUP))
        self._light = light

    def _load_named(self, name: str) -> None:
        """Import the driver of entry point ``name``, if not yet done."""
        value = self._pending.get(name)
        if value is not None:
            bound = self.register(load_entry_point(value), key_hint=name)
            del self._pending[name]
            self._order[name] = bound

    def _load_all(self) -> None:
        """Import every pending driver; one that fails to import stays
        pending (looking it up by name raises its error)."""
        for name in list(self._pending):
            try:
                self._load_named(name)
            except Exception:
                pass

    def _lookup(self, table: dict, name: str):
        """``table[name]``, importing the driver it takes: the entry point of
        that name first, every pending one if that was not it."""
        if not dict.__contains__(table, name) and self._pending:
            self._load_named(name)
            if not dict.__contains__(table, name):
                self._load_all()
        return dict.get(table, name)

    # -- lookups -----------------------------------------------------------

    def format(self, name: str) -> BoundDriver:
        try:
            return self.formats[name]
        except KeyError:
            if name in self.protocols:
                return self.protocols[name]
            raise InvalidArgumentError(f"Unknown driver '{name}'") from None

    def protocol(self, name: str) -> BoundDriver:
        try:
            return self.protocols[name]
        except KeyError:
            raise UnsupportedError(f"Unknown protocol '{name}'") from None

    def probe(self, buf: bytes, filename: str | None) -> tuple[BoundDriver | None, int]:
        """The format driver with the highest probe score (ties: first registered)."""
        best, best_score = None, 0
        for name in list(self._order):
            drv = self._order[name]
            light = None
            if drv is None:
                light = _light_probe(self._light.get(name))
                if light is None:                 # no light probe: ask the driver
                    try:
                        self._load_named(name)
                    except Exception:
                        # a driver that cannot be imported (a stale entry
                        # point) cannot claim the image; a lookup by its
                        # name still raises the import error
                        continue
                    drv = self._order[name]
            if light is not None:
                probe = light
            elif drv.format_name is None or drv.bdrv_probe is None:
                continue
            else:
                probe = drv.bdrv_probe
            try:
                score = probe(buf=buf, filename=filename) or 0
            except Exception:  # a probe must never take the open down
                score = 0
            if score > best_score:
                best, best_score = name, score
        if best is None:
            return None, 0
        self._load_named(best)
        drv = self._order[best]
        return (drv if drv is not None and drv.format_name else None), best_score


# -- entry-point discovery -----------------------------------------------------
#
# importlib.metadata costs ~10 ms of imports (email, zipfile, csv, ...) before
# it reads a single file, more than everything else a short command does.
# The scan below reads the same files -- ``entry_points.txt`` of every
# ``*.dist-info``/``*.egg-info`` directory on sys.path, first distribution of
# a name wins, in sys.path order -- with os.scandir only.  Anything it cannot
# read the same way (a zip on sys.path, an extra distribution finder on
# sys.meta_path) sends it to importlib.metadata.

def _normalize(name: str) -> str:
    out = []
    for ch in name.lower():
        out.append("_" if ch in "-_." else ch)
    text = "".join(out)
    while "__" in text:
        text = text.replace("__", "_")
    return text


def _parse_groups(text: str, into: dict[str, list[tuple[str, str]]]) -> None:
    """Add every ``[group]``'s (name, value) pairs of an entry_points.txt."""
    group = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[" and line[-1] == "]":
            group = line[1:-1].strip()
            continue
        if group is not None:
            name, sep, value = line.partition("=")
            if sep:
                into.setdefault(group, []).append((name.strip(), value.strip()))


def _scan() -> dict[str, list[tuple[str, str]]] | None:
    """group -> (name, "module:attr") on sys.path, every group in one pass;
    None: use importlib.metadata."""
    PathFinder = import_machinery()[0].PathFinder      # noqa: N806
    for finder in sys.meta_path:
        if finder is not PathFinder and hasattr(finder, "find_distributions"):
            return None
    seen: set[str] = set()
    found: dict[str, list[tuple[str, str]]] = {}
    for entry in sys.path:
        path = entry or "."
        try:
            names = [e.name for e in os.scandir(path)
                     if e.name.lower().endswith((".dist-info", ".egg-info"))]
        except NotADirectoryError:
            return None                    # a zip archive: not read here
        except OSError:
            continue                       # missing entries, path hooks
        for info in names:
            dist = _normalize(info.rpartition(".")[0].partition("-")[0])
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(path, info, "entry_points.txt"),
                          encoding="utf-8") as f:
                    text = f.read()
            except (NotADirectoryError, FileNotFoundError):
                continue                   # no entry points / an .egg-info file
            except OSError:
                return None
            _parse_groups(text, found)
    return found


_scanned: list = []                   # [result of _scan()], once per process
_ep_cache: dict[str, list[tuple[str, str]]] = {}


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, value) pairs of an entry-point group; sys.path is scanned once
    per process, for every group."""
    eps = _ep_cache.get(group)
    if eps is None:
        if not _scanned:
            _scanned.append(_scan())
        if _scanned[0] is not None:
            eps = _scanned[0].get(group, [])
        else:
            import importlib.metadata
            eps = [(ep.name, ep.value)
                   for ep in importlib.metadata.entry_points(group=group)]
        _ep_cache[group] = eps
    return list(eps)


def import_module(name: str) -> Any:
    """:func:`importlib.import_module` for absolute names, without importing
    :mod:`importlib` (and :mod:`warnings`) on every command's path."""
    module = sys.modules.get(name)
    if module is None:
        __import__(name)
        module = sys.modules[name]
    return module


def load_entry_point(value: str) -> Any:
    """The object an entry point names (``module:attr.attr [extras]``)."""
    target = value.partition("[")[0].strip()
    module, _, attrs = target.partition(":")
    obj = import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def _light_probe(value: str | None):
    return None if value is None else load_entry_point(value)


class _Table(dict):
    """name -> BoundDriver (``formats``/``protocols``); a lookup imports the
    driver it names, iterating imports them all (listings)."""

    __slots__ = ("_reg",)

    def __init__(self, reg: "DriverRegistry") -> None:
        super().__init__()
        self._reg = reg

    def __getitem__(self, name):
        drv = self._reg._lookup(self, name)
        if drv is None:
            raise KeyError(name)
        return drv

    def get(self, name, default=None):
        drv = self._reg._lookup(self, name)
        return default if drv is None else drv

    def __contains__(self, name) -> bool:
        return self._reg._lookup(self, name) is not None

    def __iter__(self):
        self._reg._load_all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._reg._load_all()
        return dict.__len__(self)

    def keys(self):
        self._reg._load_all()
        return dict.keys(self)

    def values(self):
        self._reg._load_all()
        return dict.values(self)

    def items(self):
        self._reg._load_all()
        return dict.items(self)

    def __repr__(self) -> str:
        self._reg._load_all()
        return dict.__repr__(self)


_registry: DriverRegistry | None = None
_lock = allocate_lock()           # threading.Lock, without importing threading


def get_registry() -> DriverRegistry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                reg = DriverRegistry()
                reg.load_entry_points()
                _registry = reg
    return _registry
