"""Run ``blockdrv`` commands in-process and capture what they print."""

from __future__ import annotations

import contextlib
import io
import json

from blockdrv.cli import main


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def ok(*argv: str) -> str:
    rc, out, err = cli(*argv)
    assert rc == 0, (argv, rc, err)
    return out


def info(filename: str, *args: str) -> dict:
    """``info --output=json`` without what names the place (filename, disk size)."""
    data = json.loads(ok("info", "--output=json", *args, filename))
    data.pop("filename")
    data.pop("actual-size", None)
    return data


def map_json(filename: str, *args: str, keep_offset: bool = True) -> list[dict]:
    data = json.loads(ok("map", "--output=json", *args, filename))
    if not keep_offset:
        for e in data:
            e.pop("offset", None)
    return data


def one_line_error(argv, expect: str) -> str:
    rc, out, err = cli(*argv)
    assert rc != 0, (argv, out)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert expect in err, err
    return err
