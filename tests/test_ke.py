"""KE (KnowledgeEditor) on tiny backbones: an untrained editor is a gradient step, meta-training lowers the
edit loss, exports round-trip and are refused for another backbone, edits go in order and restore bit for
bit (one-step and sequential, through the real loop), and every backbone family builds, trains and edits.

Backbones are built from sizes (`TinySpec`), cases are the in-memory ones of `conftest.make_case` or the
sample files; the world-scale training is `configs/train/ke.yaml` (minutes, not a test).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import changed, make_case, state_copy
from tiny_families import FAMILIES

import edit
from backbones import LlavaVLM, TinySpec
from datamodules.edit_datamodule import EditDataModule
from editors.checkpoint import EditorCheckpointError
from editors.ke import KnowledgeEditor
from editors.ke_networks import ConditionedUpdate
from lightning_modules.edit_cli import edit_trainer
from lightning_modules.edit_eval import EditEval
from train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = ROOT / "data" / "sample"


# ----------------------------------------------------------------- the networks


@pytest.mark.parametrize("shape, rank", [((6, 4), 1), ((6, 4), 3), ((5,), 1)])
def test_an_untrained_head_is_a_gradient_step_and_the_gates_have_their_rank(shape, rank):
    torch.manual_seed(0)
    head = ConditionedUpdate(shape, cond_dim=8, hidden_dim=16, rank=rank, init_lr=0.05)
    cond, grad = torch.randn(8), torch.randn(shape)
    torch.testing.assert_close(head(cond, grad), -0.05 * grad)
    with torch.no_grad():
        head.out.weight.normal_()
        head.out.bias.normal_()
    alpha, beta, eta = head.gates(cond)
    assert alpha.shape == beta.shape == torch.Size(shape) and eta.shape == torch.Size([])
    if len(shape) == 2:
        assert torch.linalg.matrix_rank(alpha) <= rank and torch.linalg.matrix_rank(beta) <= rank
    # delta W = -scale * sigmoid(eta) * (alpha * G + beta), as the paper's sigma(eta) (alpha . grad + beta)
    expected = -head.log_scale.exp() * torch.sigmoid(eta) * (alpha * grad + beta)
    torch.testing.assert_close(head(cond, grad), expected)


# ----------------------------------------------------------------- training


@pytest.mark.parametrize(
    "settings",
    [{"locality": "weighted", "loc_weight": 0.0}, {"locality": "lagrangian", "kl_margin": 1.0}],
    ids=["weighted", "lagrangian"],
)
def test_training_lowers_the_edit_loss_and_never_touches_the_backbone(vlm, settings):
    # A random tiny model barely responds to one step on its last MLP, so the locality terms are
    # loose here: what is checked is that the hypernetwork learns to edit through the objective.
    torch.manual_seed(0)
    editor = KnowledgeEditor(init_lr=1.0, **settings)
    editor.setup(vlm)
    before = state_copy(vlm)
    cases = [make_case(0), make_case(1)]
    optimizer = torch.optim.Adam(editor.parameters(), lr=0.03)
    losses = []
    for _ in range(10):
        out = editor.training_loss(vlm, cases)
        assert {"loss", "loss_edit", "loss_loc", "multiplier", "update_ratio"} <= out.keys()
        assert all(torch.isfinite(v).all() for v in out.values())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss_edit"].detach()))
    assert min(losses[-3:]) < losses[0] - 0.1, losses
    # Everything the objective reads got a gradient (the KL multiplier only when it is learned).
    learned = [
        p
        for n, p in editor.named_parameters()
        if n != "update_multiplier_raw" and (settings["locality"] == "lagrangian" or n != "multiplier_raw")
    ]
    assert all(p.grad is not None for p in learned)
    assert not changed(vlm, before)
    assert all(p.grad is None and not p.requires_grad for p in vlm.parameters())


def test_the_lagrange_multiplier_rises_while_its_constraint_is_violated(vlm):
    editor = KnowledgeEditor(init_lr=0.5, kl_margin=0.0, update_margin=1e-6)
    editor.setup(vlm)
    optimizer = torch.optim.Adam(editor.parameters(), lr=0.01)
    start = float(editor.multiplier().detach())
    for _ in range(2):
        optimizer.zero_grad()
        out = editor.training_loss(vlm, [make_case(0)])
        out["loss"].backward()
        optimizer.step()
    assert float(out["loss_loc"].detach()) > 0
    assert float(editor.multiplier().detach()) > start
    assert float(out["update_multiplier"]) > 0


# ----------------------------------------------------------------- checkpoints


def test_export_round_trips_and_another_backbone_is_refused(vlm, tmp_path):
    editor = KnowledgeEditor(update_margin=0.1)
    editor.setup(vlm)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.linspace(0, 0.1, p.numel()).view_as(p))
    path = editor.export(tmp_path / "ke.safetensors", vlm, extra_meta={"note": "x"})
    # The objective's settings are not the checkpoint's business: an edit config need not repeat them.
    fresh = KnowledgeEditor(locality="weighted", checkpoint=str(path))
    fresh.setup(vlm)
    assert fresh.state_dict().keys() == editor.state_dict().keys()
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in fresh.state_dict().items())
    case = make_case(0)
    before = state_copy(vlm)
    first = editor.apply(vlm, [case])
    edited = state_copy(vlm)
    first.restore()
    second = fresh.apply(vlm, [case])
    assert not changed(vlm, edited)  # the loaded editor makes the same edit, bit for bit
    second.restore()
    assert not changed(vlm, before)
    other = LlavaVLM(tiny=TinySpec(hidden_size=48))
    with pytest.raises(EditorCheckpointError, match="another backbone"):
        KnowledgeEditor(checkpoint=str(path)).setup(other)
    with pytest.raises(EditorCheckpointError):
        KnowledgeEditor(targets=["ffn:0"], checkpoint=str(path)).setup(vlm)
    with pytest.raises(EditorCheckpointError, match="parameters"):
        KnowledgeEditor(rank=2, checkpoint=str(path)).setup(vlm)


# ----------------------------------------------------------------- editing


def test_apply_edits_in_order_and_restores_bit_for_bit(vlm):
    editor = KnowledgeEditor(init_lr=0.1)
    editor.setup(vlm)
    cases = [make_case(i) for i in range(3)]
    before = state_copy(vlm)
    handle = editor.apply(vlm, cases)
    sequential = state_copy(vlm)
    assert set(changed(vlm, before)) == set(vlm.parameter_group("ffn:-1"))
    assert handle.stats["steps"] == 3 and [c["case_id"] for c in handle.stats["cases"]] == [
        "case-0",
        "case-1",
        "case-2",
    ]
    handle.restore()
    assert not changed(vlm, before)
    # K cases in one call = one case at a time, each on the model the earlier ones left.
    handles = [editor.apply(vlm, [case]) for case in cases]
    assert not changed(vlm, sequential)
    for h in reversed(handles):
        h.restore()
    assert not changed(vlm, before)


def test_a_failing_edit_leaves_nothing_behind(vlm):
    """The second case fails after the first was written: `apply` undoes the first before raising."""
    editor = KnowledgeEditor()
    editor.setup(vlm)
    before = state_copy(vlm)
    bad = make_case(2)
    bad.edit = replace(bad.edit, prompt="x" * 50_000)  # longer than the tiny model's positions
    with pytest.raises(ValueError, match="too long|positions|tokens"):
        editor.apply(vlm, [make_case(1), bad])
    assert not changed(vlm, before)


@pytest.mark.parametrize("mode", ["one_step", "sequential"])
def test_the_loop_restores_every_tensor(vlm, mode, tmp_path):
    before = state_copy(vlm)
    data = EditDataModule(
        str(SAMPLE / ("mmedit/vqa_eval.json" if mode == "one_step" else "vlkeb/eval_multihop.json")),
        str(SAMPLE / "images"),
        limit=3,
        batch_size=3,
    )
    module = EditEval(vlm, KnowledgeEditor(init_lr=0.1), mode=mode)
    edit_trainer(results_dir=str(tmp_path)).test(module, datamodule=data, verbose=False)
    scores = module.scores.compute()
    assert all(0 <= scores[k] <= 100 for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc"))
    assert not changed(vlm, before)


def test_bad_settings_are_refused(vlm):
    for kwargs in (
        {"init_lr": 0},
        {"rank": 0},
        {"locality": "margin"},
        {"loc_weight": 0},
        {"kl_margin": -1},
        {"update_margin": 0},
        {"label_smoothing": 1},
        {"multiplier_gain": 0},
    ):
        with pytest.raises(ValueError):
            KnowledgeEditor(**kwargs)
    with pytest.raises(ValueError, match="feature_layer"):
        KnowledgeEditor(feature_layer=5).setup(vlm)
    with pytest.raises(ValueError, match="1-D and 2-D"):
        ConditionedUpdate((2, 3, 4), 8, 8, 1, 0.1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_trains_edits_and_restores(family):
    vlm = FAMILIES[family]()
    vlm.requires_grad_(False)
    editor = KnowledgeEditor(init_lr=0.1, update_margin=0.1)
    editor.setup(vlm)
    cases = [make_case(0), make_case(1)]
    out = editor.training_loss(vlm, cases[:1])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and any(p.grad is not None for p in editor.parameters())
    before = state_copy(vlm)
    handle = editor.apply(vlm, cases)
    assert changed(vlm, before), family
    handle.restore()
    assert not changed(vlm, before), family


# ----------------------------------------------------------------- configs and the CLIs


def test_configs_name_ke_and_the_same_export(capsys):
    train = yaml.safe_load((ROOT / "configs" / "train" / "ke.yaml").read_text())
    edit_cfg = yaml.safe_load((ROOT / "configs" / "edit" / "ke.yaml").read_text())
    model = train["model"]["init_args"]
    assert (
        model["editor"]["class_path"]
        == edit_cfg["model"]["editor"]["class_path"]
        == "editors.ke.KnowledgeEditor"
    )
    assert model["export_path"] == edit_cfg["model"]["editor"]["init_args"]["checkpoint"]
    assert train["trainer"]["callbacks"][0]["init_args"]["monitor"].startswith("val/")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(ROOT / "configs" / "train" / "ke.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["init_args"]["offline"] is True


def test_train_py_fits_ke_and_edit_py_loads_the_export(tmp_path):
    """The path of configs/train/ke.yaml at toy size: fit on sample data, export, edit.py test loads it."""
    backbone = {"class_path": "backbones.LlavaVLM", "init_args": {"tiny": {"hidden_size": 32, "seed": 0}}}
    editor = {"class_path": "editors.ke.KnowledgeEditor", "init_args": {"init_lr": 0.1, "update_margin": 0.5}}
    export = tmp_path / "ke.safetensors"
    config = {
        "trainer": {
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/rel", "mode": "max"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_modules.editor_training.EditorTraining",
            "init_args": {"backbone": backbone, "editor": editor, "lr": 0.01, "export_path": str(export)},
        },
        "data": {
            "class_path": "datamodules.editor_data.EditorTrainData",
            "init_args": {
                "train_file": str(SAMPLE / "mmedit" / "vqa_train.json"),
                "val_file": str(SAMPLE / "mmedit" / "vqa_eval.json"),
                "image_root": str(SAMPLE / "images"),
                "batch_size": 2,
                "train_limit": 2,
                "val_limit": 2,
            },
        },
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    train_main(["fit", "--config", str(tmp_path / "train.yaml")])
    assert export.is_file()
    results = tmp_path / "results"
    edit.main(
        [
            "test",
            "--config", str(ROOT / "configs" / "edit" / "ke.yaml"),
            "--model.editor.init_args.checkpoint", str(export),
            "--data.limit", "2",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--results_dir", str(results),
        ]
    )  # fmt: skip
    summary = json.loads((results / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["editor"]["checkpoint"] == str(export)
    # The shipped config's own checkpoint belongs to the world backbone: base.yaml's tiny LLaVA refuses it.
    shipped = ROOT / "checkpoints" / "editors" / "ke_world_llava.safetensors"
    if shipped.is_file():
        with pytest.raises(SystemExit) as exit_info:
            edit.main(
                [
                    "test",
                    "--config", str(ROOT / "configs" / "edit" / "ke.yaml"),
                    "--data.limit", "1",
                    "--trainer.logger", "false",
                    "--results_dir", str(tmp_path / "refused"),
                ]
            )  # fmt: skip
        assert exit_info.value.code == 2 and isinstance(exit_info.value.__cause__, EditorCheckpointError)
