"""The `hmlstm` command run inside the test process: `hmlstm.cli.main(argv)` with stdout and stderr captured.

A subprocess spends about 10 s importing Lightning before it reads its first argument; the test process has
imported it already. What a subprocess adds (the console entry point, the interpreter printing an exit
message without a traceback) is tested once, in a subprocess, by tests/test_cli.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(argv: Sequence[str], capsys) -> CliResult:
    """`hmlstm ARGV` in this process. A SystemExit carrying a message counts as the interpreter treats it:
    exit status 1, the message on stderr (main() raises it `from None`, so a subprocess prints no traceback).
    Any other exception propagates: the test fails with its traceback."""
    from hmlstm.cli import main

    capsys.readouterr()  # drop what the test printed before
    code = 0
    message = ""
    try:
        main(list(argv))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            code, message = 1, f"{e.code}\n"
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err + message)


def assert_ok(result: CliResult) -> str:
    """The stdout of a run that must succeed (its stderr in the failure message otherwise)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

