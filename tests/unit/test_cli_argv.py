"""blockdrv.cli.argv: the command lines it reads itself parse exactly as
argparse parses them, over every command's parser; everything else is
argparse's."""

import contextlib
import importlib
import io
import random

import pytest

from blockdrv.cli.argv import ArgParser, fast_parse
from blockdrv.cli.commands import COMMANDS
from blockdrv.cli.common import CliError

PARSED = [name for name, cmd in COMMANDS.items()
          if hasattr(importlib.import_module(f"blockdrv.cli.{cmd.module}"), "parser")]


def _parser(name: str) -> ArgParser:
    return importlib.import_module(f"blockdrv.cli.{COMMANDS[name].module}").parser()


def _real(parser: ArgParser, argv: list[str]):
    """argparse's answer: its namespace as a dict, or the error it raised."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            return vars(parser.real().parse_intermixed_args(argv))
    except CliError as exc:
        return ("error", exc.message)
    except SystemExit as exc:
        return ("exit", exc.code)


def _tokens(parser: ArgParser) -> list[str]:
    opts = [n for names, _ in parser._arguments for n in names if n.startswith("-")]
    pool = opts + [o + "=v" for o in opts if o.startswith("--")]
    pool += [o + "val" for o in opts if not o.startswith("--")]
    pool += ["-" + "".join(random.sample([o[1] for o in opts if len(o) == 2], 2))
             for _ in range(6) if sum(len(o) == 2 for o in opts) >= 2]
    pool += ["img.vhdx", "x", "raw", "json", "human", "-", "--", "", "-1", "-5G", "--he",
             "--help", "-h", "a b", "-q x", "--out", "--force", "-f=raw", "--zz", "-Z",
             "=", "1M", "0x200"]
    return pool


@pytest.mark.parametrize("name", PARSED)
def test_fast_parse_is_argparse(name):
    parser = _parser(name)
    rnd = random.Random(name)
    random.seed(name)
    pool = _tokens(parser)
    fast_count = 0
    for _ in range(3000):
        argv = [rnd.choice(pool) for _ in range(rnd.randint(0, 6))]
        fast = fast_parse(parser._arguments, argv)
        if fast is None:
            continue
        fast_count += 1
        assert vars(fast) == _real(parser, argv), argv
    # the forms scripts use are read without argparse for commands whose
    # declarations it knows
    assert fast_count > 100 or fast_parse(parser._arguments, []) is None


@pytest.mark.parametrize("argv,expect", [
    (["-f", "vhdx", "--output=json", "-U", "a.vhdx"],
     {"fmt": "vhdx", "output": "json", "force_share": True, "args": ["a.vhdx"],
      "backing_chain": False}),
    (["a.vhdx", "-fvhdx", "--output", "human"],
     {"fmt": "vhdx", "output": "human", "force_share": False, "args": ["a.vhdx"],
      "backing_chain": False}),
])
def test_plain_lines_read_without_argparse(argv, expect):
    assert vars(fast_parse(_parser("info")._arguments, argv)) == expect


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--", "-x"], ["--out=json", "a"],
                                  ["-f"], ["-f", "-U", "a"], ["a", "-f=raw"], ["-Z"]])
def test_the_rest_is_argparses(argv):
    assert fast_parse(_parser("info")._arguments, argv) is None
