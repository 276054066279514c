"""Normalizers mask byte ranges anywhere in a file and are found through the
``blockdrv.normalizers`` entry point group."""

import pathlib
import tomllib

import pytest

from blockdrv.testing import compare
from blockdrv.testing.compare import Normalizer, compare_files, get_normalizer, register_normalizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def footer_format():
    """A VHD-like format: a 512-byte footer whose bytes 64..72 (a timestamp)
    differ between identical runs."""
    def fn(data, start):
        out = bytearray(data)
        out[64:72] = bytes(8)
        return bytes(out)

    register_normalizer("footer-test", fn, ranges=[(-512, None)])
    yield "footer-test"
    compare._REGISTRY.pop("footer-test", None)


def _pair(tmp_path, size=8192):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(size))
    b.write_bytes(bytes(size))
    return a, b


def _poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_range_at_the_end_of_the_file_is_masked(tmp_path, footer_format):
    a, b = _pair(tmp_path)
    _poke(b, 8192 - 512 + 64, b"\x01" * 8)          # the footer's timestamp
    assert compare_files(a, b, footer_format) is None
    assert compare_files(a, b, "raw") is not None


def test_outside_the_masked_field_differences_are_found(tmp_path, footer_format):
    a, b = _pair(tmp_path)
    _poke(b, 8192 - 512 + 100, b"\x01")             # in the footer, not masked
    diff = compare_files(a, b, footer_format)
    assert diff is not None and diff.offset == 8192 - 512 + 100, diff
    _poke(a, 8192 - 512 + 100, b"\x01")
    _poke(b, 4000, b"\x02")                          # payload before the footer
    diff = compare_files(a, b, footer_format)
    assert diff is not None and diff.offset == 4000, diff


def test_ranges_may_depend_on_the_file(tmp_path):
    register_normalizer("mid-test", lambda data, start: bytes(len(data)),
                        ranges=lambda path: [(1024, 2048), (6000, 6100)])
    try:
        a, b = _pair(tmp_path)
        _poke(b, 1500, b"x")
        _poke(b, 6050, b"y")
        assert compare_files(a, b, "mid-test") is None
        _poke(b, 2048, b"z")
        assert compare_files(a, b, "mid-test").offset == 2048
    finally:
        compare._REGISTRY.pop("mid-test", None)


def test_the_prefix_form_still_works(tmp_path):
    register_normalizer("prefix-test", lambda head: bytes(len(head)), prefix=4096)
    try:
        a, b = _pair(tmp_path)
        _poke(b, 4095, b"x")
        assert compare_files(a, b, "prefix-test") is None
        _poke(b, 4096, b"x")
        assert compare_files(a, b, "prefix-test").offset == 4096
    finally:
        compare._REGISTRY.pop("prefix-test", None)


def test_resolve_clips_and_merges():
    n = Normalizer(lambda d, s: d, [(-100, None), (0, 10), (5, 20), (950, 2000)])
    assert n.resolve("unused", 1000) == [(0, 20), (900, 1000)]


def test_raw_is_the_builtin_identity():
    assert get_normalizer("raw").fn is None
    assert get_normalizer("no-such-format").fn is None


def test_vhdx_normalizer_is_an_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["blockdrv.normalizers"]["vhdx"] == \
        "blockdrv.testing.vhdx:normalizer"
    assert "vhdx" not in getattr(compare, "_LAZY", {})       # no hard-coded table
    import blockdrv.testing.vhdx as v
    assert get_normalizer("vhdx") is v.normalizer


def test_entry_point_discovery(monkeypatch):
    """A normalizer named by an installed entry point is loaded on first use."""
    from importlib.metadata import EntryPoint

    ep = EntryPoint("ep-test", "blockdrv.testing.vhdx:normalizer", compare.ENTRY_POINT_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [ep] if group == compare.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(compare, "_DISCOVERED", False)
    monkeypatch.setattr(compare, "_REGISTRY", {"raw": compare.IDENTITY})
    import blockdrv.testing.vhdx as v
    assert get_normalizer("ep-test") is v.normalizer


def test_global_plugin_registers_no_format_tool_fixture():
    """vhdiinfo is the VHDX tests' fixture, not every pytest session's."""
    import blockdrv.testing.plugin as plugin
    from blockdrv.testing.vhdx import fixtures
    assert not hasattr(plugin, "vhdiinfo")
    assert hasattr(fixtures, "vhdiinfo")


def test_docstring_example_normalizer_works(tmp_path):
    """The example in blockdrv.testing's guide masks a header and a footer field."""
    def mask(data, start):
        data = bytearray(data)
        if start == 0:
            data[24:32] = bytes(8)
        else:
            data[-8:] = bytes(8)
        return bytes(data)

    register_normalizer("doc-test", mask, ranges=[(0, 512), (-512, None)])
    try:
        a, b = _pair(tmp_path)
        _poke(b, 24, b"\x01" * 8)
        _poke(b, 8192 - 8, b"\x02" * 8)
        assert compare_files(a, b, "doc-test") is None
        _poke(b, 8192 - 9, b"\x03")
        assert compare_files(a, b, "doc-test").offset == 8192 - 9
    finally:
        compare._REGISTRY.pop("doc-test", None)
