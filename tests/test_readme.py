"""Every command line in the README names a real command, real options and valid choices, so the
README cannot rot silently. (The demo, run by tests/test_demo.py, executes the main ones.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import enum
import inspect
import typing

import pytest
import typer

from cnnxfer.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("cnnxfer "):
                lines.append(line)
    return lines


COMMANDS = _readme_commands()


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block
    assert len(COMMANDS) >= 15  # the reference shows every command


def _enum_choices(callback) -> dict[str, list[str]]:
    """{option name: allowed values} for the options whose annotation is an Enum."""
    fn = inspect.unwrap(callback)
    out = {}
    for hint in typing.get_type_hints(fn, include_extras=True).values():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *meta = typing.get_args(hint)
        kinds = [a for a in (typing.get_args(base) or (base,)) if isinstance(a, type) and issubclass(a, enum.Enum)]
        for info in meta:
            # typer.Option("--pool", ...) inside Annotated keeps the first name in `default`
            first = getattr(info, "default", None)
            decls = ((first,) if isinstance(first, str) else ()) + tuple(getattr(info, "param_decls", None) or ())
            for decl in decls:
                if kinds and decl.startswith("-"):
                    out[decl] = [e.value for e in kinds[0]]
    return out


def _resolve(args: list[str]) -> tuple[object, list[str], list[str]]:
    """(command, the words naming it, the tokens after them), descending into groups (`inspect filters`)."""
    command, words = typer.main.get_command(app), []
    while hasattr(command, "commands") and args and args[0] in command.commands:
        command, words, args = command.commands[args[0]], [*words, args[0]], args[1:]
    return command, words, args


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line):
    command, words, tokens = _resolve(shlex.split(line)[1:])
    assert words and not hasattr(command, "commands"), f"unknown command in README: {line}"
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    choices = _enum_choices(command.callback)
    for i, token in enumerate(tokens):
        if not token.startswith("-"):
            continue
        name = token.split("=", 1)[0]
        assert name in options, f"README uses unknown option {name} in: {line}"
        if name in choices:
            value = token.split("=", 1)[1] if "=" in token else tokens[i + 1]
            assert value in choices[name], f"README uses {name} {value}; choices are {choices[name]}"


def _leaf_commands(group, prefix=()) -> set[str]:
    out = set()
    for name, command in group.commands.items():
        out |= _leaf_commands(command, (*prefix, name)) if hasattr(command, "commands") else {" ".join((*prefix, name))}
    return out


def test_every_command_is_in_the_readme():
    used = {" ".join(_resolve(shlex.split(line)[1:])[1]) for line in COMMANDS}
    missing = _leaf_commands(typer.main.get_command(app)) - used
    assert not missing, f"commands missing from the README: {missing}"
