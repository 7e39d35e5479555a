"""A bad config file is named: YAML syntax errors and unknown keys say which --config they come from."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from lightning_modules.config_errors import config_files, locate
from lightning_modules.edit_cli import EditCLI

ROOT = Path(__file__).resolve().parent.parent
FT = str(ROOT / "configs" / "edit" / "ft_llm.yaml")


def test_config_files_are_read_from_the_command_line(tmp_path) -> None:
    base = tmp_path / "base.yaml"
    args = ["test", "--config", "a.yaml", "--trainer.devices", "1", "--config=b.yaml"]
    assert config_files(args, [base]) == [base, Path("a.yaml"), Path("b.yaml")]


def test_locate_names_the_file_and_key(tmp_path) -> None:
    good, typo = tmp_path / "good.yaml", tmp_path / "typo.yaml"
    good.write_text("model:\n  editor:\n    init_args:\n      steps: 3\n")
    typo.write_text("model:\n  editor:\n    init_args:\n      stepz: 3\n")
    where = locate("Option 'stepz' is not accepted", [good, typo])
    assert f"'stepz' is set in config file {typo} at model.editor.init_args.stepz" in where
    assert str(good) not in where
    assert locate("something else entirely", [good]) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model:\n  editor:\n    init_args:\n      stepz: 3\n", "at model.editor.init_args.stepz"),
        ("model:\n  editor:\n    init_args:\n      steps: [3\n", "is not valid YAML (line 5, column 1)"),
    ],
    ids=["unknown_key", "bad_yaml"],
)
def test_edit_cli_names_the_bad_file(tmp_path, capsys, text, expected) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        EditCLI(args=["--config", FT, "--config", str(bad)], run=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {bad}" in err and expected in err


def test_train_cli_names_the_bad_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            ["fit", "--config", str(ROOT / "configs" / "train" / "world_llava.yaml"), "--config", str(bad)]
        )
    assert exit_info.value.code == 2
    assert f"'max_stepz' is set in config file {bad} at trainer.max_stepz" in capsys.readouterr().err
