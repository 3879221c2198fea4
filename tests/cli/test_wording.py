"""The command line's own wording: no abbreviated flags, a typo answered with the flag it
probably meant and the sub-command's name, a model folder given where an adapter belongs said
as such, a file given where a stage folder belongs said as such."""

from __future__ import annotations

import argparse

import pytest

from prism_deploy.cli.main import build_parser, main, unrecognized
from prism_deploy.core.errors import PrismInputError


def _commands() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser()._commands)  # type: ignore[attr-defined]


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_no_command_accepts_an_abbreviated_flag():
    for name, parser in _commands().items():
        assert parser.allow_abbrev is False, name
        for flag in _long_flags(parser):
            prefix = flag[:-1]
            if len(prefix) > 3 and prefix not in _long_flags(parser):
                found = parser._parse_optional(prefix)  # (action, ...) when the prefix would be taken for a flag
                if isinstance(found, list):  # Python 3.12+: a list of candidates
                    found = found[0] if found else None
                assert found is None or found[0] is None, (name, prefix)


def test_every_flag_typo_gets_its_flag_suggested():
    for name, parser in _commands().items():
        flags = _long_flags(parser)
        for flag in flags:
            if len(flag) < 7:
                continue
            typo = flag[:4] + flag[5] + flag[4] + flag[6:]  # two letters swapped
            if typo in flags:
                continue
            message = unrecognized([typo, "3"], parser)
            assert f"{typo}: did you mean --" in message, (name, message)


@pytest.mark.parametrize(
    "argv,command,meant",
    [
        (["run", "--chain", "c.toml", "--text", "hi", "--max-new-token", "3"], "run", "--max-new-tokens"),
        (["export-model", "m", "--role", "first", "-o", "o", "--max-seqs", "3"], "export-model", "--max-seq"),
        (["build", "a.safetensors", "--targt", "ort-cpu"], "build", "--target"),
        (["parity", "--chain", "c.toml", "--bisekt"], "parity-chain", "--bisect"),
    ],
)
def test_a_typo_names_the_sub_command_and_the_flag(argv, command, meant, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: prism-deploy {command}: unrecognized") and f"did you mean {meant}?" in err


def test_a_model_folder_where_an_adapter_belongs_is_named(tmp_path, capsys):
    from prism_deploy.format.adapter_file import read_adapter_config
    from prism_deploy.runtime.adapters import adapter_runner

    model = tmp_path / "exported"
    model.mkdir()
    (model / "model.json").write_text("{}")
    with pytest.raises(PrismInputError, match="a model folder .* where an adapter belongs"):
        adapter_runner(model, "ort-cpu")
    with pytest.raises(PrismInputError, match="a model folder .* where an adapter belongs"):
        read_adapter_config(model)
    for argv in (["inspect", str(model)], ["bench", str(model)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "a model folder" in err and "where an adapter belongs" in err, err


def test_a_file_where_a_stage_folder_belongs_is_named(tmp_path):
    from prism_deploy.serving.stage_runtime import inspect_stage

    chain_json = tmp_path / "chain.json"
    chain_json.write_text("{}")
    with pytest.raises(PrismInputError, match="a file, not a folder"):
        inspect_stage(chain_json)
    with pytest.raises(PrismInputError, match="no such folder"):
        inspect_stage(tmp_path / "missing")


def test_json_is_a_stdout_flag_in_every_command():
    for name, parser in _commands().items():
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action.nargs == 0 and action.const is True, name  # store_true: never a FILE


def test_a_typo_is_named_before_a_missing_required_flag(capsys):
    with pytest.raises(SystemExit):
        main(["export-model", "m", "--rol", "first", "-o", "o"])  # --role is required: the typo is the cause
    err = capsys.readouterr().err
    assert "unrecognized argument: --rol" in err and "did you mean --role?" in err
