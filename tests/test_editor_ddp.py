"""`train.py fit` of MEND, KE and SERAC under CPU DDP with two processes (gloo), as a user would run it.

Each run is a real `python train.py fit --trainer.devices 2 --trainer.strategy ddp` in a subprocess
(Lightning's DDP launcher starts the second process by re-running the command), on the tiny world
with a small world LLaVA. It must finish, log validation scores that cover every validation case
once (the two ranks' halves merged), and export one editor checkpoint that `setup` loads strictly.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editors.ke import KnowledgeEditor
from editors.mend import MEND
from editors.serac import SERAC
from world.backbones import WorldLlavaVLM, WorldSpec
from world.build import build_world
from world.config import load_world_config

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32, "vision_layers": 1, "num_heads": 2}

#: Small settings of each editor (class path, init args, its class to load the export with).
EDITORS = {
    "mend": ("editors.mend.MEND", {"targets": ["ffn:-2", "ffn:-1"], "rank": 8, "edit_lr": 1e-3}, MEND),
    "ke": ("editors.ke.KnowledgeEditor", {"targets": ["ffn:-1"]}, KnowledgeEditor),
    "serac": ("editors.serac.SERAC", {"cf_layers": 1}, SERAC),
}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), out, verbose=False)
    return out


def train_config(world: Path, out: Path, class_path: str, init_args: dict) -> dict:
    return {
        "trainer": {
            "max_epochs": 2,
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
                    "init_args": {"dirpath": str(out / "ckpt"), "monitor": "val/rel", "mode": "max"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_modules.editor_training.EditorTraining",
            "init_args": {
                "backbone": {
                    "class_path": "world.backbones.WorldLlavaVLM",
                    "init_args": {"world_dir": str(world), "spec": SPEC},
                },
                "editor": {"class_path": class_path, "init_args": init_args},
                "lr": 1e-3,
                "export_path": str(out / "editor.safetensors"),
                "torch_threads": 1,
            },
        },
        "data": {
            "class_path": "datamodules.editor_data.EditorTrainData",
            "init_args": {
                "format": "mmedit_vqa",
                "prompt_template": "{}",
                "loc_image_template": "{}",
                "image_root": str(world / "images"),
                "train_file": str(world / "mmedit" / "vqa_train.json"),
                "val_file": str(world / "mmedit" / "vqa_val.json"),
                "batch_size": 2,
                "train_limit": 8,
                # Odd on purpose: one rank gets a padding batch, which must not be scored twice.
                "val_limit": 3,
            },
        },
    }


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_train_py_fit_runs_under_two_process_ddp(method, tiny_world, tmp_path):
    class_path, init_args, editor_class = EDITORS[method]
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(train_config(tiny_world, tmp_path, class_path, init_args), sort_keys=False)
    )
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config),
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr, proc.stderr[-2000:]

    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/rel")]
    # 8 training cases, batch 2, two ranks: 2 steps an epoch, each rank on its own half.
    assert len(train) == 4, train
    assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in train)  # finite, not NaN
    assert len(val) == 2
    for row in val:
        for key in ("val/rel", "val/t_gen", "val/i_gen", "val/t_loc", "val/i_loc"):
            assert 0.0 <= float(row[key]) <= 100.0, (key, row[key])

    export = tmp_path / "editor.safetensors"
    assert export.is_file()
    vlm = WorldLlavaVLM(world_dir=str(tiny_world), spec=WorldSpec(**SPEC))
    editor = editor_class(**init_args, checkpoint=str(export))
    editor.setup(vlm)  # strict load: the one file rank 0 wrote holds every parameter


def test_two_process_validation_scores_equal_one_process(tiny_world, tmp_path):
    """`train.py validate` of one editor: the merged scores of two ranks are those of one process."""
    class_path, init_args, _ = EDITORS["mend"]
    scores = []
    for devices in ("1", "2"):
        out = tmp_path / f"d{devices}"
        out.mkdir()
        config = train_config(tiny_world, out, class_path, init_args)
        config["data"]["init_args"]["val_limit"] = 5  # two ranks: 3 + 2 cases, one padding batch
        (out / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable, str(ROOT / "train.py"), "validate", "--config", str(out / "train.yaml"),
            "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto",
        ]  # fmt: skip
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out / "logs" / "version_0" / "metrics.csv") as f:
            (row,) = [r for r in csv.DictReader(f) if r.get("val/rel")]
        scores.append({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
    one, two = scores
    assert one.keys() == two.keys() and {"val/rel", "val/t_loc", "val/i_loc"} <= one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
