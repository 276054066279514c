"""qemu's NBD address syntax (no server needed)."""

from __future__ import annotations

import pytest

from blockdrv.block import split_protocol
from blockdrv.errors import InvalidArgumentError, UnsupportedError
from blockdrv.protocols.nbd.uri import Address, parse


@pytest.mark.parametrize("text,expect", [
    ("nbd://localhost/", Address(export="", host="localhost")),
    ("nbd://localhost", Address(export="", host="localhost")),
    ("nbd://127.0.0.1:10810/disk", Address(export="disk", host="127.0.0.1", port=10810)),
    ("nbd+tcp://[::1]:5000/a%20b", Address(export="a b", host="::1", port=5000)),
    ("nbd://h/dir/name", Address(export="dir/name", host="h")),
    ("nbd+unix:///?socket=/tmp/s.sock", Address(export="", path="/tmp/s.sock")),
    ("nbd+unix:///exp?socket=rel.sock", Address(export="exp", path="rel.sock")),
    ("NBD+UNIX:///exp?socket=/s", Address(export="exp", path="/s")),
    ("nbd:unix:/tmp/s.sock", Address(export="", path="/tmp/s.sock")),
    ("nbd:unix:/tmp/s.sock:exportname=x", Address(export="x", path="/tmp/s.sock")),
    ("nbd:localhost:10811", Address(export="", host="localhost", port=10811)),
    ("nbd:localhost", Address(export="", host="localhost")),
    ("nbd:[::1]:99:exportname=e", Address(export="e", host="::1", port=99)),
])
def test_parse(text, expect):
    assert parse(text) == expect


@pytest.mark.parametrize("text,why", [
    ("nbd+unix:///x", "exactly one query parameter"),
    ("nbd+unix://host/x?socket=/s", "takes no host"),
    ("nbd+unix:///x?socket=/s&foo=1", "exactly one query parameter"),
    ("nbd://host/x?socket=/s", "takes no query"),
    ("nbd:///x", "no host"),
    ("nbd://host:99999/x", "Invalid NBD address"),
    ("nbd://host/" + "x" * 5000, "longer than 4096"),
    ("nbd:host:port", "invalid port"),
    ("nbd:unix:", "no socket path"),
])
def test_parse_refuses(text, why):
    with pytest.raises(InvalidArgumentError) as info:
        parse(text)
    assert why in str(info.value)


@pytest.mark.parametrize("scheme", ["nbds", "nbds+tcp", "nbds+unix"])
def test_tls_schemes_refused(scheme):
    with pytest.raises(UnsupportedError, match="TLS"):
        parse(f"{scheme}://h/x" if "unix" not in scheme else f"{scheme}:///x?socket=/s")


@pytest.mark.parametrize("name,proto", [
    ("nbd+unix:///x?socket=/s", "nbd"), ("nbd://h/x", "nbd"), ("nbd:unix:/s", "nbd"),
    ("https://h/d.vhdx", "fsspec"), ("s3://b/k", "fsspec"), ("az://c/b", "fsspec"),
    ("memory://x", "fsspec"), ("file:///tmp/x", "fsspec"),
    ("memory:x", "memory"), ("/tmp/a:b", "file"), ("foo://x", "file"),
])
def test_protocols_claim_uri_schemes(name, proto):
    got, rest = split_protocol(name)
    assert got == proto
    if proto in ("nbd", "fsspec") and "://" in name:
        assert rest == name            # the driver parses the whole URI
