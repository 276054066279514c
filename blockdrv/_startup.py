"""Start-up: what a short command pays before it does any work, in one place.

``blockdrv info x.vhdx`` should cost little more than the interpreter's own
start-up.  What made it slow was not the image but what the package loads:

* ``dataclasses`` imports ``inspect`` (with ``ast``, ``dis``, ``tokenize``...)
  and writes and compiles every record's ``__init__``, ``__repr__`` and
  ``__eq__`` when its module is imported.  :func:`dataclass` below keeps the
  same declarations (annotations, defaults, :func:`field`) but compiles a
  record's ``__init__`` on its first instance only; ``repr`` and ``==`` are
  generic.  :mod:`dataclasses` itself still works on these records
  (``fields``, ``replace``, ``asdict``): their ``__dataclass_fields__`` are
  built, importing it, when first asked for.
* ``pluggy`` imports ``inspect`` too, and ``register`` calls
  ``inspect.signature`` on every hook implementation.  The markers below
  (:func:`hookspec`, :func:`hookimpl`) set exactly the attributes pluggy
  reads, and :func:`argnames` takes argument names from the code object, so
  :mod:`blockdrv.plugins` binds and checks drivers without pluggy; its
  ``PluginManager`` is built (and checks every driver again) only when asked
  for.
* ``typing`` (~3 ms, and a ``typing.NamedTuple`` class costs a few hundred
  microseconds to build): :data:`TYPE_CHECKING` and :class:`NamedTuple`
  stand in for it on the commands' path.
* Driver modules are imported when their name is looked up, formats probed by
  light probes (:mod:`blockdrv._lazy`); numpy only by whole-table scans of
  tables too large for the memcmp scans (:mod:`blockdrv.drivers.vhdx.bat`),
  through :func:`lazy_module`; each command's module and argument parser is
  built only for the command run (:mod:`blockdrv.cli`).

``benchmarks/startup.py --imports`` lists what each short command loads.
"""

from __future__ import annotations

import sys

PROJECT = "blockdrv"

# typing's own flag, without importing typing (~3 ms, and each NamedTuple
# class built through it): modules import the names they use in annotations
# only under ``if TYPE_CHECKING:``, which type checkers take as true whatever
# module the name comes from
TYPE_CHECKING = False

# -- records -----------------------------------------------------------------

_MISSING = object()


class _Field:
    __slots__ = ("name", "default", "default_factory", "init", "repr", "compare")

    def __init__(self, default=_MISSING, default_factory=_MISSING, init=True, repr=True,
                 compare=True):
        if default is not _MISSING and default_factory is not _MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = None
        self.default = default
        self.default_factory = default_factory
        self.init = init
        self.repr = repr
        self.compare = compare


def field(*, default=_MISSING, default_factory=_MISSING, init: bool = True,
          repr: bool = True, compare: bool = True):
    """As :func:`dataclasses.field` (the options records use)."""
    return _Field(default, default_factory, init, repr, compare)


def _classvar(annotation) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar", "t.ClassVar"))


def dataclass(cls=None, /, *, frozen: bool = False, eq: bool = True, repr: bool = True):
    """A record class as :func:`dataclasses.dataclass` makes it (``__init__``
    from the annotated fields and their defaults, ``__repr__``, ``__eq__``,
    ``frozen``), without importing :mod:`dataclasses` or compiling anything
    at class creation."""
    def wrap(cls):
        return _make_record(cls, frozen, eq, repr)
    return wrap if cls is None else wrap(cls)


def _make_record(cls, frozen: bool, eq: bool, want_repr: bool):
    fields: dict[str, _Field] = {}
    for base in reversed(cls.__mro__[1:]):
        fields.update(base.__dict__.get("__record_fields__", {}))
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _classvar(annotation):
            continue
        value = cls.__dict__.get(name, _MISSING)
        f = value if isinstance(value, _Field) else _Field(default=value)
        if type(f.default) in (list, dict, set):
            raise ValueError(f"mutable default {type(f.default)} for field {name} "
                             "is not allowed: use default_factory")
        f.name = name
        if isinstance(value, _Field):
            if f.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        fields[name] = f
    seen_default = False
    for f in fields.values():
        if not f.init:
            continue
        if f.default is not _MISSING or f.default_factory is not _MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    own = cls.__dict__
    cls.__record_fields__ = fields
    cls.__record_frozen__ = frozen
    cls.__match_args__ = tuple(n for n, f in fields.items() if f.init)
    cls.__dataclass_fields__ = _DataclassFields()
    if "__init__" not in own:
        cls.__init__ = _init_stub(cls)
    if want_repr and "__repr__" not in own:
        cls.__repr__ = _repr
    if eq and "__eq__" not in own:
        cls.__eq__ = _eq
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
        if eq and not explicit_hash:
            cls.__hash__ = _hash
    elif eq and not explicit_hash:
        cls.__hash__ = None
    return cls


# instances a record builds by binding its fields in a loop before it compiles
# its ``__init__``: compiling costs ~0.1-0.2 ms, a short command builds most
# record classes once or twice, and a hot record soon pays the compile back
_COMPILE_AFTER = 8


def _init_stub(cls):
    """``__init__`` that binds the fields generically for the first few
    instances, then compiles the real one for ``cls`` and steps aside."""
    uses = [0]

    def __init__(self, *args, **kwargs):
        uses[0] += 1
        if uses[0] <= _COMPILE_AFTER:
            _bind_init(cls, self, args, kwargs)
            return
        real = _compile_init(cls)
        cls.__init__ = real
        real(self, *args, **kwargs)
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _bind_init(cls, self, args: tuple, kwargs: dict) -> None:
    """What the compiled ``__init__`` does, field by field (same errors)."""
    fields = cls.__record_fields__
    names = cls.__match_args__
    where = f"{cls.__qualname__}.__init__()"
    if len(args) > len(names):
        required = sum(1 for n in names if fields[n].default is _MISSING
                       and fields[n].default_factory is _MISSING)
        takes = (f"{len(names) + 1}" if required == len(names)
                 else f"from {required + 1} to {len(names) + 1}")
        raise TypeError(f"{where} takes {takes} positional arguments but "
                        f"{len(args) + 1} were given")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{where} got an unexpected keyword argument {key!r}")
        if key in values:
            raise TypeError(f"{where} got multiple values for argument {key!r}")
        values[key] = value
    missing = [n for n in names if n not in values and fields[n].default is _MISSING
               and fields[n].default_factory is _MISSING]
    if missing:
        raise TypeError(f"{where} missing {len(missing)} required positional argument"
                        f"{'s' if len(missing) > 1 else ''}: "
                        + ", ".join(repr(n) for n in missing))
    store = object.__setattr__ if cls.__record_frozen__ else setattr
    for name, f in fields.items():
        if f.init and name in values:
            value = values[name]
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        elif f.default is not _MISSING:
            value = f.default
        else:
            continue
        store(self, name, value)
    if hasattr(cls, "__post_init__"):
        self.__post_init__()


def _compile_init(cls):
    fields = cls.__record_fields__
    frozen = cls.__record_frozen__
    env = {"_MISSING": _MISSING, "_setattr": object.__setattr__}
    params, body = [], []
    for name, f in fields.items():
        if f.default_factory is not _MISSING:
            env[f"_f_{name}"] = f.default_factory
        if f.default is not _MISSING:
            env[f"_d_{name}"] = f.default
        if f.init:
            if f.default is not _MISSING:
                params.append(f"{name}=_d_{name}")
            elif f.default_factory is not _MISSING:
                params.append(f"{name}=_MISSING")
            else:
                params.append(name)
            value = name if f.default_factory is _MISSING else \
                f"_f_{name}() if {name} is _MISSING else {name}"
        elif f.default_factory is not _MISSING:
            value = f"_f_{name}()"
        elif f.default is not _MISSING:
            value = f"_d_{name}"
        else:
            continue
        body.append(f"_setattr(self, {name!r}, {value})" if frozen
                    else f"self.{name} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    src = (f"def __init__(self, {', '.join(params)}):\n    "
           + ("\n    ".join(body) or "pass") + "\n")
    exec(src, env)                                      # noqa: S102 - our own source
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _repr(self) -> str:
    fields = type(self).__record_fields__
    inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, f in fields.items() if f.repr)
    return f"{type(self).__qualname__}({inner})"


def _key(self) -> tuple:
    return tuple(getattr(self, n) for n, f in type(self).__record_fields__.items() if f.compare)


def _eq(self, other):
    if other.__class__ is self.__class__:
        return _key(self) == _key(other)
    return NotImplemented


def _hash(self) -> int:
    return hash(_key(self))


def _frozen_setattr(self, name, value):
    if type(self).__record_frozen__ and name in type(self).__record_fields__:
        import dataclasses
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _frozen_delattr(self, name):
    if name in type(self).__record_fields__:
        import dataclasses
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


class _DataclassFields:
    """``__dataclass_fields__`` for :mod:`dataclasses` (``fields``,
    ``replace``, ``asdict``): real ``Field`` objects, made on first access
    by declaring the same fields on a throw-away dataclass."""

    def __get__(self, obj, cls):
        import dataclasses
        ns = {"__annotations__": {}}
        for name, f in cls.__record_fields__.items():
            ns["__annotations__"][name] = cls.__dict__.get("__annotations__", {}).get(
                name, "object")
            kw = {"init": f.init, "repr": f.repr, "compare": f.compare}
            if f.default is not _MISSING:
                kw["default"] = f.default
            if f.default_factory is not _MISSING:
                kw["default_factory"] = f.default_factory
            ns[name] = dataclasses.field(**kw)
        shadow = dataclasses.dataclass(type(cls.__name__, (), ns))
        real = shadow.__dataclass_fields__
        type.__setattr__(cls, "__dataclass_fields__", real)
        return real


def field_names(record) -> tuple[str, ...]:
    """The fields of a record class or instance, in declaration order."""
    cls = record if isinstance(record, type) else type(record)
    return tuple(cls.__record_fields__)


def replace(obj, /, **changes):
    """A copy of record ``obj`` with ``changes`` (as :func:`dataclasses.replace`)."""
    for name, f in type(obj).__record_fields__.items():
        if f.init and name not in changes:
            changes[name] = getattr(obj, name)
    return type(obj)(**changes)


# -- named tuples ------------------------------------------------------------------

def _namedtuple(name: str, fields: tuple, defaults: tuple, module: str | None):
    """The class :func:`collections.namedtuple` builds, built the same way
    without importing :mod:`collections` (~2 ms: keyword, operator, reprlib...
    that no short command needs otherwise)."""
    try:
        from _collections import _tuplegetter as getter      # the C accessor namedtuple uses
    except ImportError:                                      # pragma: no cover - other Pythons
        from operator import itemgetter

        def getter(i, doc):
            return property(itemgetter(i), doc=doc)
    arg_list = ", ".join(fields) + ("," if len(fields) == 1 else "")
    new = eval(f"lambda _cls, {arg_list}: _tuple_new(_cls, ({arg_list}))",  # noqa: S307
               {"_tuple_new": tuple.__new__, "__builtins__": {}, "__name__": f"namedtuple_{name}"})
    new.__name__ = "__new__"
    new.__doc__ = f"Create new instance of {name}({', '.join(fields)})"
    if defaults:
        new.__defaults__ = defaults
    count = len(fields)
    repr_fmt = "(" + ", ".join(f"{f}=%r" for f in fields) + ")"

    def _make(cls, iterable):
        result = tuple.__new__(cls, iterable)
        if len(result) != count:
            raise TypeError(f"Expected {count} arguments, got {len(result)}")
        return result

    def _replace(self, /, **kwds):
        result = self._make(map(kwds.pop, fields, self))
        if kwds:
            raise ValueError(f"Got unexpected field names: {list(kwds)!r}")
        return result

    def __repr__(self):
        return self.__class__.__name__ + repr_fmt % self

    def _asdict(self):
        return dict(zip(self._fields, self))

    def __getnewargs__(self):
        return tuple(self)

    namespace = {"__doc__": f"{name}({', '.join(fields)})", "__slots__": (),
                 "_fields": fields,
                 "_field_defaults": dict(zip(fields[count - len(defaults):], defaults))
                 if defaults else {},
                 "__new__": new, "_make": classmethod(_make), "_replace": _replace,
                 "__repr__": __repr__, "_asdict": _asdict, "__getnewargs__": __getnewargs__,
                 "__match_args__": fields}
    for method in (new, _make, _replace, __repr__, _asdict, __getnewargs__):
        method.__qualname__ = f"{name}.{method.__name__}"
    for index, field_name in enumerate(fields):
        namespace[field_name] = getter(index, f"Alias for field number {index}")
    cls = type(name, (tuple,), namespace)
    cls.__module__ = module or cls.__module__
    return cls


class _NamedTupleMeta(type):
    def __new__(mcls, name, bases, ns):
        if ns.get("_root"):
            return super().__new__(mcls, name, bases, ns)
        fields = [f for f, a in ns.get("__annotations__", {}).items() if not _classvar(a)]
        defaults = []
        for f in fields:
            if f in ns:
                defaults.append(ns[f])
            elif defaults:
                raise TypeError(f"Non-default namedtuple field {f} cannot follow "
                                "default field" + ("s" if len(defaults) > 1 else ""))
        cls = _namedtuple(name, tuple(fields), tuple(defaults), ns.get("__module__"))
        for key, value in ns.items():
            if key not in fields and key not in ("__module__", "__qualname__",
                                                  "__annotations__"):
                setattr(cls, key, value)
        cls.__qualname__ = ns.get("__qualname__", name)
        cls.__annotations__ = ns.get("__annotations__", {})
        return cls


class NamedTuple(metaclass=_NamedTupleMeta):
    """``typing.NamedTuple``'s class syntax (annotated fields, defaults,
    methods, a docstring), the class :func:`collections.namedtuple` makes,
    without typing or collections."""

    _root = True


# -- pluggy's markers, without pluggy ------------------------------------------

def hookspec(function=None, firstresult: bool = False, historic: bool = False,
             warn_on_impl=None, warn_on_impl_args=None):
    """``pluggy.HookspecMarker("blockdrv")``: the same options, the same
    ``blockdrv_spec`` attribute."""
    if historic and firstresult:
        raise ValueError("cannot have a historic firstresult hook")

    def mark(func):
        func.blockdrv_spec = {"firstresult": firstresult, "historic": historic,
                              "warn_on_impl": warn_on_impl,
                              "warn_on_impl_args": warn_on_impl_args}
        return func
    return mark if function is None else mark(function)


def hookimpl(function=None, hookwrapper: bool = False, optionalhook: bool = False,
             tryfirst: bool = False, trylast: bool = False, specname: str | None = None,
             wrapper: bool = False):
    """``pluggy.HookimplMarker("blockdrv")``: the same options, the same
    ``blockdrv_impl`` attribute (a driver marked with it registers with
    pluggy as with pluggy's own marker)."""
    def mark(func):
        func.blockdrv_impl = {"wrapper": wrapper, "hookwrapper": hookwrapper,
                              "optionalhook": optionalhook, "tryfirst": tryfirst,
                              "trylast": trylast, "specname": specname}
        return func
    return mark if function is None else mark(function)


def argnames(func) -> tuple[str, ...]:
    """The arguments a hook passes to ``func`` (pluggy's ``varnames``: the
    positional ones without a default, less ``self``), read from its code
    object; callables without one are asked through pluggy."""
    method = hasattr(func, "__self__") and hasattr(func, "__func__")
    target = func.__func__ if method else func
    code = getattr(target, "__code__", None)
    if code is None:
        from pluggy._hooks import varnames
        return varnames(func)[0]
    names = code.co_varnames[:code.co_argcount]
    ndefaults = len(getattr(target, "__defaults__", None) or ())
    if ndefaults:
        names = names[:-ndefaults]
    if names and (method or ("." in getattr(target, "__qualname__", "")
                             and names[0] == "self")):
        names = names[1:]
    return tuple(names)


# -- modules imported on first use -----------------------------------------------

class lazy_module:
    """A stand-in for module ``name``, imported on first attribute access:
    ``np = lazy_module("numpy", globals(), "np")`` costs nothing until a
    whole-table scan uses it, then rebinds ``np`` to the module itself."""

    def __init__(self, name: str, namespace: dict | None = None, alias: str | None = None):
        self._name = name
        self._ns = namespace
        self._alias = alias

    def __getattr__(self, attr: str):
        module = sys.modules.get(self._name)
        if module is None:
            __import__(self._name)
            module = sys.modules[self._name]
        if self._ns is not None and self._alias:
            self._ns[self._alias] = module
        return getattr(module, attr)


def import_machinery():
    """(machinery, util): objects with the names of :mod:`importlib.machinery`
    and :mod:`importlib.util` used here (PathFinder, EXTENSION_SUFFIXES,
    ExtensionFileLoader; spec_from_file_location, module_from_spec).  The
    interpreter's own import system already holds them, loaded at start-up;
    the public modules import :mod:`importlib`, :mod:`warnings` and
    :mod:`contextlib` on top, for a short command a millisecond for nothing."""
    external = sys.modules.get("_frozen_importlib_external")
    bootstrap = sys.modules.get("_frozen_importlib")
    if all(hasattr(external, n) for n in ("PathFinder", "EXTENSION_SUFFIXES",
                                           "ExtensionFileLoader", "spec_from_file_location")) \
            and hasattr(bootstrap, "module_from_spec"):
        class util:                         # noqa: N801 - stands for the module
            spec_from_file_location = staticmethod(external.spec_from_file_location)
            module_from_spec = staticmethod(bootstrap.module_from_spec)
        return external, util
    import importlib.machinery
    import importlib.util
    return importlib.machinery, importlib.util


def load_extension(name: str):
    """C extension module ``name`` (``package.module``) loaded from its
    package's folder without running the package's ``__init__`` (``crc32c``'s
    imports importlib.metadata and argparse, ~10 ms), registered under its own
    name so that a later ``import package`` reuses it; None if it cannot be."""
    if name in sys.modules:
        return sys.modules[name]
    package, _, leaf = name.rpartition(".")
    try:
        import os
        machinery, util = import_machinery()
        spec = machinery.PathFinder.find_spec(package)
        for folder in (spec.submodule_search_locations or ()) if spec else ():
            for suffix in machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, leaf + suffix)
                if os.path.exists(path):
                    loader = machinery.ExtensionFileLoader(name, path)
                    mod = util.module_from_spec(
                        util.spec_from_file_location(name, path, loader=loader))
                    loader.exec_module(mod)
                    sys.modules[name] = mod
                    return mod
    except Exception:  # noqa: BLE001 - any surprise: the caller's ordinary import
        sys.modules.pop(name, None)
    return None
