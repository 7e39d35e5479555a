"""Every YAML under configs/ parses (and the tiny and edit ones instantiate) without a download."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from backbones.base import VLM
from lightning_modules.edit_cli import EditCLI

ROOT = Path(__file__).resolve().parent.parent
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert {p.parent.name for p in ALL_YAML} >= {"edit", "backbones"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_yaml_is_valid(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "backbones").glob("*.yaml")), ids=lambda p: p.name
)
def test_backbone_config_parses(path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=VLM, sub_configs=True)
    cfg = parser.parse_args(["--backbone", str(path)])
    if path.name.startswith("tiny_"):
        init = parser.instantiate_classes(cfg)
        assert isinstance(init.backbone, VLM)


EDIT_DIR = ROOT / "configs" / "edit"


def _is_method(path: Path) -> bool:
    return "editor" in (yaml.safe_load(path.read_text()).get("model") or {})


@pytest.mark.parametrize(
    "path",
    sorted([*EDIT_DIR.glob("*.yaml"), *(ROOT / "configs" / "data").glob("*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_edit_config_instantiates(path, monkeypatch):
    """Method files build as they are; overlays (sequential, cross-task, data) build stacked on FT (LLM).

    base.yaml is read first by every run (EditCLI's default config), so every case covers it.
    """
    monkeypatch.chdir(ROOT)
    configs = [path] if _is_method(path) else [EDIT_DIR / "ft_llm.yaml", path]
    args = [a for c in configs for a in ("--config", str(c))]
    cli = EditCLI(args=[*args, "--trainer.logger", "false"], run=False)
    assert cli.model.backbone is not None and cli.model.editor is not None
    assert cli.datamodule is not None
