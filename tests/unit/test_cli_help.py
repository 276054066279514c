"""``--help``: ``blockdrv --help`` lists every command of the command table, and
each command's ``--help`` exits 0 with its usage line, a description and
every flag its parser accepts, each explained.  The flags are taken from the
parsers themselves, so a flag added without help fails here."""

from __future__ import annotations

import argparse
import importlib

import pytest

from blockdrv.cli import COMMANDS, main
from blockdrv.cli.io import session as io_session

PARSED = [name for name in COMMANDS if name != "io"]     # io parses qemu-io's getopt


def _help(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_top_level_help_is_the_command_table(capsys):
    out = _help(capsys, "--help")
    assert _help(capsys, "help") == _help(capsys, "-h") == out
    for name, cmd in COMMANDS.items():
        assert f"  {cmd.usage}\n" in out                 # the syntax line
        summary = [line for line in out.splitlines() if line.split()[:1] == [name]
                   or line.startswith(f"  {name} ")]
        assert any(cmd.summary in line for line in summary), name


def test_every_command_module_runs_and_parses():
    for name, cmd in COMMANDS.items():
        mod = importlib.import_module(f"blockdrv.cli.{cmd.module}")
        assert callable(mod.run), name
        if name != "io":
            assert mod.parser().prog == f"blockdrv {name}"


@pytest.mark.parametrize("name", PARSED)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_command_help_explains_every_flag(capsys, name, flag):
    out = _help(capsys, name, flag)
    cmd = COMMANDS[name]
    assert out.startswith(f"usage: blockdrv {cmd.usage}\n")
    assert cmd.summary[1:] in out.splitlines()[2]          # the description
    parser = importlib.import_module(f"blockdrv.cli.{cmd.module}").parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        for option in action.option_strings:
            assert option in out, (name, option)
        # the usage line names it too, by one of its spellings
        assert any(f"[{o}" in cmd.usage for o in action.option_strings) or \
            not action.option_strings, (name, action.dest)
        first_words = action.help.split()[0]
        assert first_words in out, (name, action.dest)


def test_io_help_lists_every_supported_flag(capsys):
    out = _help(capsys, "io", "--help")
    for long, (short, _) in io_session._LONGOPTS.items():
        if short in io_session._UNSUPPORTED:
            continue                                      # refused with one line instead
        assert f"-{short}, --{long}" in out, long


def test_help_after_other_arguments_still_helps(capsys):
    out = _help(capsys, "convert", "-O", "vhdx", "--help")
    assert out.startswith("usage: blockdrv convert")
