"""blockdrv._startup: records that behave as dataclasses, pluggy's markers and
argument names without pluggy, and what a short command does not import."""

import dataclasses
import os
import subprocess
import sys
from typing import ClassVar

import pluggy
import pytest

from blockdrv import _startup, hookspecs, plugins
from blockdrv._startup import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["bound", "compiled"])
def init_path(request, monkeypatch):
    """Every record test twice: instances bound field by field (a record's
    first few) and through the compiled ``__init__`` (the later ones)."""
    if request.param == "compiled":
        monkeypatch.setattr(_startup, "_COMPILE_AFTER", 0)
    return request.param


def _both(decorate_kw=None):
    """The same class body under our record and under dataclasses."""
    kw = decorate_kw or {}

    def body(deco, fld):
        @deco(**kw)
        class R:
            a: int
            b: str = "x"
            c: list = fld(default_factory=list)
            d: int = fld(default=3, repr=False, compare=False)
            e: ClassVar[int] = 9
        return R
    return body(dataclass, field), body(dataclasses.dataclass, dataclasses.field)


@pytest.mark.usefixtures("init_path")
def test_records_behave_as_dataclasses():
    ours, ref = _both()
    for cls in (ours, ref):
        r = cls(1)
        assert (r.a, r.b, r.c, r.d) == (1, "x", [], 3) and cls.e == 9
        assert r.c is not cls(1).c
        assert r == cls(1, "x", [], 99) and r != cls(2) and r != (1, "x", [], 3)
        assert cls.__hash__ is None
        assert cls.__match_args__ == ("a", "b", "c", "d")
        with pytest.raises(TypeError):
            cls()
        with pytest.raises(TypeError):
            cls(1, f=2)
    assert repr(ours(1, "y", [2])).endswith("R(a=1, b='y', c=[2])")
    assert repr(ours(1, "y", [2])).split(".")[-1] == repr(ref(1, "y", [2])).split(".")[-1]


@pytest.mark.usefixtures("init_path")
def test_frozen_records():
    ours, ref = _both({"frozen": True})
    for cls in (ours, ref):
        r = cls(1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.a = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del r.b
        h = cls(1, c=())
        assert hash(h) == hash(cls(1, c=(), d=5)) and {h: 1}[cls(1, c=())] == 1


@pytest.mark.usefixtures("init_path")
def test_dataclasses_functions_work_on_records():
    ours, _ = _both()
    r = ours(1, "y", [2])
    assert dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)] == ["a", "b", "c", "d"]
    assert dataclasses.asdict(r) == {"a": 1, "b": "y", "c": [2], "d": 3}
    s = dataclasses.replace(r, b="z")
    assert type(s) is ours and (s.a, s.b, s.c) == (1, "z", [2])
    assert _startup.replace(r, a=5) == ours(5, "y", [2])
    assert _startup.field_names(ours) == ("a", "b", "c", "d")


@pytest.mark.usefixtures("init_path")
def test_record_rules():
    with pytest.raises(ValueError):
        @dataclass
        class Bad:
            x: list = []
    with pytest.raises(TypeError):
        @dataclass
        class Order:
            x: int = 1
            y: int

    @dataclass
    class Base:
        x: int = 1

    @dataclass
    class Child(Base):
        y: int = 2

        def __post_init__(self):
            self.z = self.x + self.y

    c = Child(5)
    assert (c.x, c.y, c.z) == (5, 2, 7) and Child(5) == Child(5, 2)


def test_no_compile_before_the_first_instances(init_path):
    @dataclass
    class Lazy:
        x: int = 0
    stub = Lazy.__init__
    made = [Lazy(i) for i in range(_startup._COMPILE_AFTER)]
    assert Lazy.__init__ is stub and [m.x for m in made] == list(range(len(made)))
    Lazy(1)
    assert Lazy.__init__ is not stub and Lazy(2).x == 2


@pytest.mark.usefixtures("init_path")
@pytest.mark.parametrize("args,kwargs", [((), {}), ((1, 2, 3, 4, 5), {}), ((1,), {"a": 2}),
                                         ((), {"zz": 1}), ((1,), {"zz": 1}),
                                         ((), {"b": "x"})])
def test_init_errors_as_compiled(args, kwargs):
    """The field-by-field binding refuses what the compiled __init__ refuses."""
    ours, ref = _both()
    with pytest.raises(TypeError) as theirs:
        ref(*args, **kwargs)
    with pytest.raises(TypeError) as mine:
        ours(*args, **kwargs)
    assert str(mine.value).split("()", 1)[1] == str(theirs.value).split("()", 1)[1]


def test_markers_are_pluggys():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    theirs = pluggy.HookimplMarker(hookspecs.PROJECT)

    class Drv:
        format_name = "x"

        @_startup.hookimpl(tryfirst=True)
        def bdrv_probe(self, buf):
            return 7

        @theirs(tryfirst=True)
        def bdrv_get_info(self, bs):
            return None
    d = Drv()
    assert d.bdrv_probe.blockdrv_impl == d.bdrv_get_info.blockdrv_impl
    pm.register(d)
    assert pm.hook.bdrv_probe(buf=b"", filename=None) == [7]
    ours = _startup.hookspec(firstresult=True)(lambda a: None)
    ref = pluggy.HookspecMarker(hookspecs.PROJECT)(firstresult=True)(lambda a: None)
    assert ours.blockdrv_spec == ref.blockdrv_spec


def _f(a, b, c=1, *args, d=2, **kw):
    pass


class _C:
    def m(self, bs, offset, nbytes=0):
        pass

    @staticmethod
    def s(buf, filename):
        pass

    @classmethod
    def k(cls, buf):
        pass


@pytest.mark.parametrize("func", [_f, _C().m, _C.m, _C.s, _C().s, _C.k, lambda x, y=1: 0,
                                  len])
def test_argnames_as_pluggy(func):
    from pluggy._hooks import varnames
    assert _startup.argnames(func) == varnames(func)[0]


def test_registry_binds_as_pluggy_does():
    reg = plugins.DriverRegistry()
    reg.load_entry_points()
    reg._load_all()
    pm = reg.pm                     # built now, over every driver registered
    for bound in list(reg.formats.values()) + list(reg.protocols.values()):
        for hook in plugins._BOUND_HOOKS:
            caller = getattr(pm.hook, hook)
            mine = [i for i in caller.get_hookimpls() if i.plugin is bound.plugin]
            ours = getattr(bound, hook)
            assert (ours is None) == (not mine), (bound, hook)
            if mine and tuple(mine[-1].argnames) == tuple(caller.spec.argnames):
                assert ours == mine[-1].function


def test_registry_refuses_what_pluggy_refuses():
    class Bad:
        format_name = "bad"

        @_startup.hookimpl
        def bdrv_probe(self, buf, nonsense):
            return 0
    reg = plugins.DriverRegistry()
    with pytest.raises(pluggy.PluginValidationError):
        reg.register(Bad())
    with pytest.raises(pluggy.PluginValidationError):
        plugins.DriverRegistry().pm.register(Bad())
    assert "bad" not in dict.keys(reg.formats)


def test_pm_follows_later_registrations():
    class Late:
        protocol_name = "late"

        @_startup.hookimpl
        def bdrv_get_info(self, bs):
            return "late"
    reg = plugins.DriverRegistry()
    pm = reg.pm
    reg.register(Late())
    assert pm.hook.bdrv_get_info(bs=None) == "late"


@pytest.mark.parametrize("cmd", [["--help"], ["create", "-f", "raw", "{d}/x.raw", "1M"],
                                 ["info", "{d}/x.raw"], ["check", "-f", "raw", "{d}/x.raw"],
                                 ["map", "{d}/x.raw"], ["map", "--output=json", "{d}/x.raw"],
                                 ["io", "-c", "read 0 4k", "{d}/x.raw"],
                                 ["io", "-r", "-c", "read 0 4k", "{d}/x.raw"],
                                 ["info", "{d}/x.vhdx"], ["check", "{d}/x.vhdx"],
                                 ["map", "{d}/x.vhdx"], ["io", "-c", "read 0 4k", "{d}/x.vhdx"],
                                 ["info", "{d}/x.qcow2"], ["check", "{d}/x.qcow2"],
                                 ["map", "{d}/x.qcow2"], ["io", "-c", "read 0 4k", "{d}/x.qcow2"],
                                 ["io", "-c", "write 64k 4k", "{d}/x.qcow2"]])
def test_short_commands_load_no_heavy_module(tmp_path, cmd):
    from blockdrv import api
    if not (tmp_path / "x.vhdx").exists():
        api.create_image(str(tmp_path / "x.vhdx"), "vhdx", "1G").close()
        api.create_image(str(tmp_path / "x.raw"), "raw", "1M").close()
        api.create_image(str(tmp_path / "x.qcow2"), "qcow2", "1G").close()
    argv = [a.format(d=tmp_path) for a in cmd]
    # what blockdrv adds to the interpreter's own start-up (site may import
    # typing or inspect itself, as a sandbox's .pth hook does here)
    code = ("import sys\nbefore = set(sys.modules)\nimport blockdrv.cli as c\n"
            "rc = c.main(sys.argv[1:])\n"
            "heavy = [m for m in ('numpy', 'inspect', 'dataclasses', 'pluggy', 'typing', "
            "'argparse', 're', 'enum', 'gettext', 'locale', 'threading', 'importlib') "
            "if m in sys.modules and m not in before]\n"
            "assert not heavy, heavy\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-S", "-c", code, *argv], env=_bare_env(),
                         capture_output=True, text=True)
    assert res.returncode in (0, 63) and "Traceback" not in res.stderr, res.stderr


def test_entry_point_scan_agrees_with_importlib_metadata():
    import importlib.metadata
    scanned = plugins._scan()
    if scanned is None:
        pytest.skip("this sys.path is read through importlib.metadata itself")
    for group in ("blockdrv.drivers", "blockdrv.probes", "pytest11", "console_scripts"):
        ref = {(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group)}
        assert set(scanned.get(group, ())) == ref, group


def test_named_tuples_as_typing_builds_them():
    import typing

    def body(base):
        class P(base):
            """A point."""
            x: int
            y: int = 0

            def norm(self) -> int:
                return abs(self.x) + abs(self.y)
        return P
    ours, ref = body(_startup.NamedTuple), body(typing.NamedTuple)
    for cls in (ours, ref):
        p = cls(3, -4)
        assert p == (3, -4) and p.norm() == 7 and cls(1) == (1, 0) and cls.__doc__ == "A point."
        assert p._replace(y=1) == (3, 1) and cls._fields == ("x", "y")
        assert cls.__qualname__.endswith("P") and cls.__module__ == __name__
    assert repr(ours(1, 2)) == repr(ref(1, 2))
    for cls in (ours, ref):
        p = cls(3, -4)
        assert cls._make([5, 6]) == (5, 6) and p._asdict() == {"x": 3, "y": -4}
        assert cls.__match_args__ == ("x", "y") and cls._field_defaults == {"y": 0}
        assert cls.__new__.__defaults__ == (0,) and p.__getnewargs__() == (3, -4)
        assert isinstance(p, tuple) and not hasattr(p, "__dict__")
        with pytest.raises(ValueError):
            p._replace(z=1)
    for bad in ((1, 2, 3), ()):
        with pytest.raises(TypeError) as mine:
            ours(*bad)
        with pytest.raises(TypeError) as theirs:
            ref(*bad)
        assert str(mine.value).split(".", 1)[1] == str(theirs.value).split(".", 1)[1]
    with pytest.raises(TypeError):
        class Bad(_startup.NamedTuple):
            a: int = 0
            b: int


def test_hand_scanners_match_the_expressions_they_replace():
    """URI schemes, size fractions and -o splitting are scanned by hand on
    the commands' path (no re); each equals the regular expression it
    replaced, over random strings of the characters that matter."""
    import random
    import re

    from blockdrv.block import uri_scheme
    from blockdrv.options import _fraction_end, split_options
    fraction = re.compile(r"\.[0-9]*(?:[eE][+-]?[0-9]+)?")
    scheme = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
    rnd = random.Random(12)
    alphabet = ".0123456789eE+-kx:/aZ,= \0\u0663"
    for _ in range(50000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
        assert _fraction_end("." + s, 0) == fraction.match("." + s).end(), s
        m = scheme.match(s)
        assert uri_scheme(s) == (m.group(1) if m else None), s
        old = []
        for part in re.split(r"(?<!,),(?!,)", s.replace(",,", "\0")):
            part = part.replace("\0", ",")
            if part:
                key, eq, val = part.partition("=")
                old.append((key, val if eq else None))
        assert split_options(s) == old, s


def _bare_env() -> dict:
    """For ``python -S``: the checkout and the site directories on the path,
    but no site module and so no ``.pth`` hooks (an editable install's import
    finder, a sandbox's certificates), which import re, collections... first
    and would hide what blockdrv itself imports."""
    import site
    paths = [ROOT, *site.getsitepackages(), site.getusersitepackages()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
