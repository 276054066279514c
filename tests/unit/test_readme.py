"""The README's commands stay true: .ci/run runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    part = text.split(section, 1)[1]
    return re.search(r"```sh\n(.*?)\n```", part, re.S).group(1)


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "## Running the tests" in ci
    command = _block("## Running the tests")
    assert "apt-get install" in command and "qemu-utils" in command
    assert "pytest" in command


def test_quick_start_is_one_line_that_creates_writes_inspects_checks():
    command = _block("## Quick start")
    assert "\n" not in command
    for word in ("blockdrv create -f vhdx", "blockdrv io", "blockdrv info", "blockdrv check"):
        assert word in command
