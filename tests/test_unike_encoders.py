"""UniKE's knowledge encoders: Eq. 4 / Eq. 5 as written, W_zeta's fit, training by `train.py fit`, export.

The states come from `knowledge.mine` on the tiny world with a small random world LLaVA (a few
seconds); `train.py fit` trains `EncoderTraining` on them through `KnowledgeStatesData`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from editors.checkpoint import EditorCheckpointError
from editors.unike_encoders import (
    KnowledgeEncoders,
    load_encoders,
    semantic_loss,
    truthfulness_loss,
    zeta_loss,
)
from knowledge import KnowledgeStates, KnowledgeStoreError, load_knowledge_states
from knowledge.mine import run as mine_run
from knowledge.sources import WithheldSource
from train import main as train_main
from world.backbones import WorldLlavaVLM, WorldSpec
from world.build import build_world
from world.config import load_world_config

#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32, "vision_layers": 1, "num_heads": 2}
OTHER_SPEC = {**SPEC, "hidden_size": 48}
LAYERS = [-2, -1]


# ----------------------------------------------------------------- the losses, read off the equations


def cos(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    return (F.cosine_similarity(a, b, dim=0) / temperature).item()


def eq4_by_hand(pos: torch.Tensor, neg: torch.Tensor, temperature: float, include_self: bool) -> float:
    """Eq. 4 summed over i, with explicit sums (h_i itself left out of both when not include_self)."""
    total = 0.0
    rows = [(x, i, True) for i, x in enumerate(pos)] + [(x, i, False) for i, x in enumerate(neg)]
    for x, i, is_pos in rows:
        same = [(h, j) for j, h in enumerate(pos if is_pos else neg)]
        other = [(h, j) for j, h in enumerate(neg if is_pos else pos)]

        def keep(j: int, same_set: bool, i: int = i) -> bool:
            return include_self or not (same_set and j == i)

        num = sum(math.exp(cos(x, h, temperature)) for h, j in same if keep(j, True))
        den = num + sum(math.exp(cos(x, h, temperature)) for h, _ in other)
        total += -math.log(num / den)
    return total


def eq5_by_hand(sem: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for i, q in enumerate(sem):
        num = math.exp(cos(q, pos[i], temperature)) + math.exp(cos(q, neg[i], temperature))
        den = sum(math.exp(cos(q, h, temperature)) for h in (*pos, *neg))
        total += -math.log(num / den)
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("include_self", [True, False])
def test_truthfulness_loss_is_eq4(temperature, include_self):
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    got = truthfulness_loss(pos, neg, temperature, include_self).item()
    # Averaged over the batch rather than summed: the same minimiser, a scale that does not grow with n.
    assert got == pytest.approx(eq4_by_hand(pos, neg, temperature, include_self) / 5, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_semantic_loss_is_eq5(temperature):
    g = torch.Generator().manual_seed(1)
    sem, pos, neg = (torch.randn(4, 6, generator=g) for _ in range(3))
    got = semantic_loss(sem, pos, neg, temperature).item()
    assert got == pytest.approx(eq5_by_hand(sem, pos, neg, temperature) / 4, rel=1e-5)


def test_encoder_shapes_identity_start_and_zeta():
    enc = KnowledgeEncoders(hidden_size=16, layers=[-2, -1], truth_dim=4, width=8, depth=2, num_layers=4)
    h = torch.randn(3, 5, 16)
    # Enc_Sem starts as the identity: before training Eq. 5 compares raw states.
    assert torch.equal(enc.semantic(-1, h), h)
    assert enc.truthful(-2, h).shape == (3, 5, 4)
    assert enc.zeta_map(-1, torch.randn(7, 4)).shape == (7, 16)
    # A layer may be named by its other index when the layer count is known.
    assert torch.equal(enc.truthful(3, h), enc.truthful(-1, h))
    with pytest.raises(KeyError, match="cover layers"):
        enc.truthful(0, h)
    states = KnowledgeStates(
        [-2, -1],
        sem={-2: torch.randn(6, 16), -1: torch.randn(6, 16)},
        pos={-2: torch.randn(6, 16), -1: torch.randn(6, 16)},
        neg={-2: torch.randn(6, 16), -1: torch.randn(6, 16)},
    )
    zeta = enc.zeta(-1, states)
    pos, neg = enc.truthful(-1, states.pos[-1]).mean(0), enc.truthful(-1, states.neg[-1]).mean(0)
    assert zeta.shape == (16,) and not zeta.requires_grad
    torch.testing.assert_close(zeta, enc.zeta_map(-1, pos - neg))


def test_zeta_loss_trains_w_zeta_only():
    enc = KnowledgeEncoders(hidden_size=8, layers=[-1], truth_dim=4, width=8)
    pos, neg = torch.randn(10, 8), torch.randn(10, 8)
    zeta_loss(enc, -1, pos, neg).backward()
    assert enc.w_zeta["layer-1"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.tru.parameters())


# ----------------------------------------------------------------- training end to end


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny world and its knowledge folder (withheld facts on 6 renderings), mined by `knowledge.mine`."""
    root = tmp_path_factory.mktemp("encoders")
    world = root / "world"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), world, verbose=False)
    vlm = WorldLlavaVLM(world_dir=str(world), spec=WorldSpec(**SPEC))
    out = root / "knowledge"
    mine_run(vlm, str(out), withheld=WithheldSource(str(world), renderings=6), layers=LAYERS, progress=False)
    return world, out


def train_config(states: Path, out: Path) -> dict:
    return {
        "trainer": {
            "max_epochs": 6,
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
                    "init_args": {"dirpath": str(out / "ckpt"), "monitor": "val/loss", "mode": "min"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_modules.encoder_training.EncoderTraining",
            "init_args": {
                "truth_dim": 8,
                "width": 32,
                "lr": 3e-3,
                "zeta_lr": 1e-2,
                "temperature": 0.3,
                "export_path": str(out / "encoders.safetensors"),
                "torch_threads": 1,
            },
        },
        "data": {
            "class_path": "datamodules.knowledge_states.KnowledgeStatesData",
            "init_args": {"states_dir": str(states), "val_fraction": 0.2, "batch_size": 32},
        },
    }


@pytest.fixture(scope="module")
def trained(knowledge, tmp_path_factory) -> Path:
    _, states = knowledge
    out = tmp_path_factory.mktemp("train")
    path = out / "encoders.yaml"
    path.write_text(yaml.safe_dump(train_config(states, out), sort_keys=False))
    train_main(["fit", "--config", str(path)])
    return out


def test_fit_lowers_the_losses_and_logs_retrieval(trained):
    with open(trained / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 6 and len(train) > 6
    assert float(train[-1]["train/loss"]) < float(train[0]["train/loss"])
    for part in ("loss", "loss_tru", "loss_sem", "loss_zeta"):
        assert float(val[-1][f"val/{part}"]) < float(val[0][f"val/{part}"]), part
    for metric in ("sem_top1", "sem_top1_fact", "sem_top1_raw", "tru_acc", "tru_acc_raw"):
        assert 0 <= float(val[-1][f"val/{metric}"]) <= 1, metric
        assert val[-1][f"val/{metric}/-1"], metric
    assert float(val[-1]["val/zeta_r2"]) > float(val[0]["val/zeta_r2"])


def test_export_round_trips_and_another_backbone_is_refused(trained, knowledge):
    world, states_dir = knowledge
    path = trained / "encoders.safetensors"
    vlm = WorldLlavaVLM(world_dir=str(world), spec=WorldSpec(**SPEC))
    encoders = load_encoders(path, vlm)
    assert (
        encoders.layers == LAYERS and encoders.hidden_size == SPEC["hidden_size"] and encoders.truth_dim == 8
    )
    best = [p for p in (trained / "ckpt").glob("*.ckpt")]
    assert len(best) == 1
    ckpt = torch.load(best[0], map_location="cpu", weights_only=True)["state_dict"]
    for name, value in encoders.state_dict().items():
        assert torch.equal(ckpt[f"encoders.{name}"], value), name
    states = load_knowledge_states(states_dir, vlm)
    assert encoders.zeta(-1, states).shape == (SPEC["hidden_size"],)
    assert torch.equal(encoders.truthful(1, states.pos[-1]), encoders.truthful(-1, states.pos[-1]))
    other = WorldLlavaVLM(world_dir=str(world), spec=WorldSpec(**OTHER_SPEC))
    with pytest.raises(EditorCheckpointError, match="another backbone") as info:
        load_encoders(path, other)
    message = str(info.value)
    assert str(path) in message and "hidden_size" in message and "\n" not in message
    # Same sizes, other weights: the states (and so the spaces) differ too.
    reseeded = WorldLlavaVLM(world_dir=str(world), spec=WorldSpec(**{**SPEC, "seed": 1}))
    with pytest.raises(EditorCheckpointError, match="weights_digest"):
        load_encoders(path, reseeded)


def test_states_of_another_backbone_are_refused_before_training(knowledge, tmp_path):
    world, states = knowledge
    config = train_config(states, tmp_path)
    config["data"]["init_args"]["backbone"] = {
        "class_path": "world.backbones.WorldLlavaVLM",
        "init_args": {"world_dir": str(world), "spec": OTHER_SPEC},
    }
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # KnowledgeStoreError itself, or (once train.py counts it among its user errors) the one-line exit
    # it causes.
    with pytest.raises((KnowledgeStoreError, SystemExit)) as info:
        train_main(["fit", "--config", str(path)])
    error = info.value if isinstance(info.value, KnowledgeStoreError) else info.value.__cause__
    assert isinstance(error, KnowledgeStoreError)
    assert str(states / "states") in str(error) and "another backbone" in str(error)
    assert not (tmp_path / "encoders.safetensors").exists()
