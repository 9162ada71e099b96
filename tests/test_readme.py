"""Every command in the README's shell blocks runs as written: the install and the test run are what CI itself
does (.ci/run); each `hmlstm fit|validate|test|predict` command is parsed by the CLI with --print_config (every
option exists and has a valid value, nothing is trained); other commands' options must appear in their --help.
The CLI runs in this process (tests/cli_run.py): a subprocess would add 10 s of imports per command."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import assert_ok, run_cli

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = ("fit", "validate", "test", "predict")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_has_the_three_commands_of_the_design():
    commands = readme_commands()
    assert any(c.startswith("pip install") for c in commands)
    assert "hmlstm fit" in commands
    assert "python -m pytest" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert next(c for c in commands if c.startswith("pip install")) in ci and "python -m pytest" in ci


@pytest.mark.parametrize("command", [c for c in readme_commands() if not c.startswith(("pip install", "python -m pytest"))])
def test_readme_command_is_valid(command, capsys, monkeypatch):
    argv = shlex.split(command)
    monkeypatch.chdir(ROOT)  # the README's relative paths are the repository's
    if argv[0] == "hmlstm" and len(argv) > 1 and argv[1] in LIGHTNING or argv == ["hmlstm", "fit"]:
        out = assert_ok(run_cli([*argv[1:], "--print_config"], capsys))
        assert "model:" in out and "trainer:" in out, f"{command}: {out[-2000:]}"
        return
    if argv[0] == "hmlstm":
        run = run_cli([argv[1], "--help"], capsys)
        helper = f"hmlstm {argv[1]}"
    elif argv[0] == "python" and argv[1].endswith(".py"):
        run = subprocess.run([sys.executable, argv[1], "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        helper = argv[1]
    else:
        pytest.fail(f"the README runs {command!r}, which this test does not know how to check")
    assert run.returncode == 0, run.stderr[-2000:]
    for opt in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert opt in run.stdout, f"{command}: {opt} is not an option of {helper}"
