"""Every numeric option of every command, attacked (issue 17, section 4): ``nan``, ``1e308``,
250 digits, negatives, fractions for integers, empty strings. Each is one ``error:`` line and
exit 2 from the parser, before any file is read; values inside the range parse to themselves.
The options are found by walking the parser, so a new numeric option is covered when added
(and one added with a bare ``type=int``/``type=float`` fails ``test_every_numeric_option_is_checked``)."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_deploy.cli.main import build_parser, main

HOSTILE = [
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e308",
    "-1e308",
    "9" * 250,
    "-" + "9" * 250,
    "-1",
    "0.5",
    "1e3",
    "0x10",
    "",
    " ",
    "1_000",
    "١٢",
    "3.0e400",
    "NaN",
]


def numeric_options() -> list[tuple[str, str, argparse.Action]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, p in sub.choices.items():
        for action in p._actions:
            if getattr(action.type, "limit", None) is not None:
                found.append((command, action.option_strings[0] if action.option_strings else action.dest, action))
    return found


OPTIONS = numeric_options()


def test_every_numeric_option_is_checked():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        (c, a.option_strings or a.dest)
        for c, p in sub.choices.items()
        for a in p._actions
        if a.type in (int, float) and not a.choices
    ]
    assert bare == [], "numeric options without a range (use prism_deploy.cli.numbers.number)"
    assert len(OPTIONS) > 40


@pytest.mark.parametrize("command,option,action", OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
def test_hostile_values_are_one_line_before_any_work(command, option, action, capsys):
    limit = action.type.limit
    for text in HOSTILE:
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 200
            continue
        # accepted: then it is a number (or a comma list of numbers) inside the range
        for v in value if isinstance(value, tuple) else (value,):
            assert isinstance(v, (int, float)) and math.isfinite(v), (text, v)
            below = v <= limit.low if limit.low_open else v < limit.low
            assert not below and v <= limit.high, (text, v)
    # through the command line: exit 2, one line naming the option, nothing on stdout
    if option.startswith("-"):
        argv = [command, option, "nan"]
    else:  # positionals: valid values before this one, "nan" for it
        positionals = [a for c, o, a in OPTIONS if c == command and not o.startswith("-")]
        argv = [command, *["8"] * positionals.index(action), "nan"]
    if option.startswith("-") and action.nargs == 2:
        argv += ["1"]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (argv, out)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert (option if option.startswith("-") else action.metavar) in lines[0], err


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(OPTIONS) - 1),
    text=st.one_of(st.text(max_size=30), st.integers().map(str), st.floats().map(repr)),
)
def test_any_text_parses_into_the_range_or_is_refused(index, text):
    _, _, action = OPTIONS[index]
    limit = action.type.limit
    try:
        value = action.type(text)
    except argparse.ArgumentTypeError:
        return
    for v in value if isinstance(value, tuple) else (value,):
        assert isinstance(v, limit.kind) or (limit.kind is float and isinstance(v, int))
        assert math.isfinite(v)
        below = v <= limit.low if limit.low_open else v < limit.low
        assert not below and v <= limit.high
