"""The README stays true to the code: every flag of every entry point is in it, and every command in its code
blocks parses with its program's own parser (nothing is run)."""
import os
import re
import shlex

import pytest

import bench
import config
import report
import study
import sweep
from conftest import ROOT

PARSERS = {"train.py": config.build_parser, "sweep.py": sweep.build_parser, "study.py": study.build_parser,
           "bench.py": bench.build_parser, "report.py": report.build_parser}
PASSES_THE_REST_TO_TRAIN = ("sweep.py", "study.py")  # their own flags, then train.py's


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_commands() -> list[list[str]]:
    """Every `python PROGRAM ...` line of the README's code blocks (continuations joined, comments, a
    leading environment assignment and $VARIABLES made plain words), as argument lists after the program."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"\$\{?[A-Z_]+\}?", "1", line), comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if len(words) >= 2 and words[0] == "python" and words[1] in PARSERS:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_every_flag_of_every_entry_point_is_in_the_readme(program):
    text = readme()
    flags = [flag for action in PARSERS[program]()._actions for flag in action.option_strings if flag != "-h"]
    assert flags and [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", text)] == []


def test_every_command_in_the_readme_parses_with_its_programs_parser(capsys):
    commands = readme_commands()
    assert {command[0] for command in commands} == set(PARSERS)  # each entry point shown at least once
    for program, *argv in commands:
        parser = PARSERS[program]()
        try:
            if program in PASSES_THE_REST_TO_TRAIN:
                config.build_parser().parse_args(parser.parse_known_args(argv)[1])
            else:
                parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README: python {program} {' '.join(argv)}: {capsys.readouterr().err}") from None
