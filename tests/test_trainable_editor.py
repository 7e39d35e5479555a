"""Trained editors end to end: `train.py fit` trains one, `edit.py test` loads it, another backbone refuses it.

The editor is `toy_editor.LearnedStepEditor` (one gradient step with learned per-row step sizes, a
real trainable editor of 160 parameters); the data is the tiny synthetic world's editor-train and
validation splits, read by the benchmark loaders; the backbone is a small, randomly initialised
world LLaVA (the world's word tokenizer, so answers are a word or two), built from the config.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from toy_editor import LearnedStepEditor

import edit
from datamodules.editor_data import EditorTrainData
from editors.checkpoint import EditorCheckpointError
from editors.trainable import TrainableEditor
from lightning_modules.train_cli import TRAIN_BASE_CONFIG
from train import main as train_main
from world.backbones import WorldLlavaVLM, WorldSpec
from world.build import build_world
from world.config import load_world_config

#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32, "vision_layers": 1, "num_heads": 2}
#: The same backbone but wider: what the exported checkpoint must be refused for.
OTHER_SPEC = {**SPEC, "hidden_size": 48}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), out, verbose=False)
    return out


def world_data(world: Path, split: str) -> dict:
    """The world's MMEdit E-VQA split as a data section (raw questions, as the world backbone learns them)."""
    return {
        "format": "mmedit_vqa",
        "prompt_template": "{}",
        "loc_image_template": "{}",
        "image_root": str(world / "images"),
        **({"annotation_file": str(world / "mmedit" / f"vqa_{split}.json")} if split else {}),
    }


def backbone_config(world: Path, spec: dict) -> dict:
    return {
        "class_path": "world.backbones.WorldLlavaVLM",
        "init_args": {"world_dir": str(world), "spec": spec},
    }


def train_config(world: Path, out: Path, max_epochs: int = 6) -> dict:
    """What a `configs/train/<method>.yaml` holds: EditorTraining + EditorTrainData, best by val/rel."""
    return {
        "trainer": {
            "max_epochs": max_epochs,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(out),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(out / "ckpt"),
                        "monitor": "val/rel",
                        "mode": "max",
                        "save_last": True,
                    },
                }
            ],
        },
        "model": {
            "class_path": "lightning_modules.editor_training.EditorTraining",
            "init_args": {
                "backbone": backbone_config(world, SPEC),
                "editor": {"class_path": "toy_editor.LearnedStepEditor", "init_args": {"init_lr": 1.0}},
                "lr": 0.3,
                "export_path": str(out / "editor.safetensors"),
            },
        },
        "data": {
            "class_path": "datamodules.editor_data.EditorTrainData",
            "init_args": {
                **world_data(world, ""),
                "train_file": str(world / "mmedit" / "vqa_train.json"),
                "val_file": str(world / "mmedit" / "vqa_val.json"),
                # One batch of the same four cases per step, so the loss of the first and the last
                # step are comparable; validation on four held-out cases.
                "batch_size": 4,
                "train_limit": 4,
                "val_limit": 4,
            },
        },
    }


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory) -> Path:
    """`train.py fit` of the toy editor on the world (a few seconds); the folder with logs and exports."""
    out = tmp_path_factory.mktemp("train")
    train_main(["fit", "--config", str(write_yaml(out / "toy.yaml", train_config(tiny_world, out)))])
    return out


def run_edit(world: Path, out: Path, checkpoint: Path, spec: dict) -> edit.EditCLI:
    config = {
        "model": {
            "backbone": backbone_config(world, spec),
            "editor": {
                "class_path": "toy_editor.LearnedStepEditor",
                "init_args": {"checkpoint": str(checkpoint)},
            },
        },
        "data": {**world_data(world, "eval"), "limit": 3},
    }
    return edit.main(
        [
            "test",
            "--config", str(write_yaml(out / "edit.yaml", config)),
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--results_dir", str(out / "results"),
        ]
    )  # fmt: skip


# ----------------------------------------------------------------- end to end


def test_fit_lowers_the_loss_logs_validation_and_exports(trained):
    rows = read_metrics(trained)
    train = [r for r in rows if r["train/loss"]]
    val = [r for r in rows if r["val/rel"]]
    assert len(train) == 6 and len(val) == 6
    first, last = float(train[0]["train/loss"]), float(train[-1]["train/loss"])
    assert last < first - 0.1, (first, last)
    assert float(train[-1]["train/loss_edit"]) < float(train[0]["train/loss_edit"])
    assert all(r["train/loss_loc"] for r in train)
    for key in ("val/rel", "val/t_gen", "val/i_gen", "val/t_loc", "val/i_loc"):
        assert all(0 <= float(r[key]) <= 100 for r in val), key
    # The exported file is the best .ckpt's editor (and holds nothing of the backbone).
    exported = load_file(str(trained / "editor.safetensors"))
    assert exported and all(k.startswith("log_lr.") for k in exported)
    best = [p for p in (trained / "ckpt").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    ckpt = torch.load(best[0], map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("backbone.")]
    assert all(torch.equal(ckpt["state_dict"][f"editor.{k}"], v) for k, v in exported.items())


def test_edit_loads_the_exported_editor_and_scores(trained, tiny_world, tmp_path):
    checkpoint = trained / "editor.safetensors"
    cli = run_edit(tiny_world, tmp_path, checkpoint, SPEC)
    loaded = cli.model.editor.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(str(checkpoint)).items())
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert all(summary[k] is not None for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc"))
    assert summary["editor"]["checkpoint"] == str(checkpoint)
    assert summary["editor"]["checkpoint_sha256"]  # a retrained file at the same path is another run


def test_another_backbone_refuses_the_checkpoint_in_one_line(trained, tiny_world, tmp_path, capsys):
    checkpoint = trained / "editor.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        run_edit(tiny_world, tmp_path, checkpoint, OTHER_SPEC)
    assert exit_info.value.code == 2
    assert isinstance(exit_info.value.__cause__, EditorCheckpointError)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(checkpoint) in errors[0] and "another backbone" in errors[0]
    assert "hidden_size" in errors[0]


def test_fit_resumes_from_the_last_ckpt(trained, tiny_world, tmp_path):
    """The .ckpt (editor, optimizer and loop states, no backbone) resumes where training stopped."""
    # last.ckpt is rewritten whenever the monitored score improves, so it may be a few steps back.
    last = trained / "ckpt" / "last.ckpt"
    done = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < done <= 6
    config = train_config(tiny_world, tmp_path, max_epochs=7)
    train_main(["fit", "--config", str(write_yaml(tmp_path / "toy.yaml", config)), "--ckpt_path", str(last)])
    rows = [r for r in read_metrics(tmp_path) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == list(range(done, 7))  # the steps after the checkpoint's only
    # Resuming on another backbone is refused before any step, in one line.
    (tmp_path / "other").mkdir()
    config = train_config(tiny_world, tmp_path / "other", max_epochs=7)
    config["model"]["init_args"]["backbone"] = backbone_config(tiny_world, OTHER_SPEC)
    other = write_yaml(tmp_path / "other" / "toy.yaml", config)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(other), "--ckpt_path", str(last)])
    assert exit_info.value.code == 2 and isinstance(exit_info.value.__cause__, EditorCheckpointError)


# ----------------------------------------------------------------- the contract, without Lightning


@pytest.fixture(scope="module")
def vlm(tiny_world) -> WorldLlavaVLM:
    model = WorldLlavaVLM(str(tiny_world), spec=WorldSpec(**SPEC))
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def train_cases(tiny_world) -> list:
    data = EditorTrainData(
        str(tiny_world / "mmedit" / "vqa_train.json"), None, **world_data(tiny_world, ""), train_limit=2
    )
    data.setup("fit")
    return [data.train_set[i] for i in range(2)]


def test_edits_restore_and_training_never_touches_the_backbone(vlm, train_cases):
    editor = LearnedStepEditor(init_lr=1.0)
    editor.setup(vlm)
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    losses = editor.training_loss(vlm, train_cases)
    assert {"loss", "loss_edit", "loss_loc"} <= losses.keys()
    losses["loss"].backward()
    assert all(p.grad is not None for p in editor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in vlm.parameters())
    handle = editor.apply(vlm, train_cases)  # a sequence of two edits
    target = next(iter(vlm.parameter_group("ffn:-1")))
    assert not torch.equal(vlm.model.state_dict()[target], before[target])
    handle.restore()
    assert all(torch.equal(v, before[k]) for k, v in vlm.model.state_dict().items())


def test_export_round_trip_and_setup_is_idempotent(vlm, tmp_path):
    editor = LearnedStepEditor()
    with pytest.raises(RuntimeError, match="setup"):
        editor.export(tmp_path / "never.safetensors", vlm)
    editor.setup(vlm)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.linspace(0, 1, p.numel()))
    path = editor.export(tmp_path / "e.safetensors", vlm, extra_meta={"note": "x"})
    fresh = LearnedStepEditor(checkpoint=str(path))
    fresh.setup(vlm)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), editor.parameters(), strict=True))
    # A second setup (fit, then validate) keeps trained weights instead of reloading the file.
    with torch.no_grad():
        next(fresh.parameters()).add_(1.0)
    trained_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.setup(vlm)
    assert all(torch.equal(v, trained_state[k]) for k, v in fresh.state_dict().items())
    # Another editor class, or another attachment point, is refused by name.
    with pytest.raises(EditorCheckpointError, match="attached|another backbone|parameter"):
        LearnedStepEditor(targets=["ffn:0"], checkpoint=str(path)).setup(vlm)
    # nn.Module.apply stays reachable under its other name.
    seen: list[str] = []
    editor.apply_to_modules(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "LearnedStepEditor"


def test_the_contract_is_enforced():
    class Incomplete(TrainableEditor):
        def attached_groups(self) -> list[str]:
            return ["ffn:-1"]

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    assert isinstance(LearnedStepEditor(), torch.nn.Module)


def test_training_order_is_seeded_and_reshuffled_per_epoch(tiny_world):
    def order(seed: int, epoch: int) -> list[str]:
        data = EditorTrainData(
            str(tiny_world / "mmedit" / "vqa_train.json"),
            None,
            **world_data(tiny_world, ""),
            batch_size=5,
            seed=seed,
        )
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [c.case_id for batch in loader for c in batch]

    first = order(0, 0)
    assert first == order(0, 0) and sorted(first) == sorted(order(0, 1)) and len(first) == 24
    assert first != order(0, 1) and first != order(1, 0)


# ----------------------------------------------------------------- train.py's CLI


def test_train_cli_reads_the_base_config_and_names_a_bad_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(ROOT / "configs" / "train" / "world_tiny.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed_everything"] == 0 and printed["trainer"]["inference_mode"] is False
    assert printed["model"]["class_path"] == "lightning_modules.world_backbone.WorldBackboneTraining"
    assert TRAIN_BASE_CONFIG.is_file()
    bad = write_yaml(tmp_path / "bad.yaml", {"trainer": {"max_epochz": 1}})
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert f"config file {bad}" in capsys.readouterr().err
