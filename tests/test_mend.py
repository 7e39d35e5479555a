"""MEND on tiny backbones: exact gradient factors, a meta-training loss that falls, exports that round-trip
and are refused for another backbone, edits that restore bit for bit, and every backbone family.

Backbones are built from sizes (`TinySpec`), cases are the in-memory ones of `conftest.make_case`; the
world-scale training is `configs/train/mend.yaml` (minutes, not a test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import changed, make_case, state_copy
from tiny_families import FAMILIES

import edit
from backbones import LlavaVLM, TinySpec
from editors.checkpoint import EditorCheckpointError
from editors.mend import MEND, edited_linears, gradient_factors
from editors.mend_networks import GradientMLP, RunningNorm
from train import main as train_main
from world.build import build_world
from world.config import load_world_config

ROOT = Path(__file__).resolve().parent.parent
#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_factors_are_the_fine_tuning_gradient(vlm):
    """`delta.T @ x` is autograd's weight gradient, for lower layers too (paths through edited layers above)."""
    linears = edited_linears(vlm, ["ffn:-2", "ffn:-1"])
    assert len(linears) == 6 and all(m.weight.dim() == 2 for m in linears.values())
    probes = [make_case(0).edit, make_case(1).edit]  # two rows: padding rows carry no gradient
    factors = gradient_factors(vlm, linears, probes)
    weights = [m.weight for m in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(vlm.loss(probes), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for (name, (x, delta)), grad in zip(factors.items(), grads, strict=True):
        assert x.shape[0] == delta.shape[0] > 0, name
        torch.testing.assert_close(delta.T @ x, grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(not p.requires_grad and p.grad is None for p in vlm.model.parameters())


def test_networks_start_as_identity_and_norm_statistics_are_exact():
    torch.manual_seed(0)
    rows = torch.randn(50, 6) * 3 + 1
    norm = RunningNorm(6)
    assert torch.equal(norm(rows), rows / (1 + norm.eps))  # nothing seen yet: identity
    norm.update(rows[:7])
    norm.update(rows[7:])  # merged batch by batch = computed at once
    torch.testing.assert_close(norm.mean.float(), rows.mean(0))
    torch.testing.assert_close(norm.std().float(), rows.std(0))
    net = GradientMLP(x_dim=4, delta_dim=3, n_modes=2, rank=2)
    x, delta = torch.randn(5, 4), torch.randn(5, 3)
    x_new, delta_new = net(x, delta, mode=1)
    torch.testing.assert_close(x_new, x)
    torch.testing.assert_close(delta_new, delta)


def test_input_clip_and_anchored_networks():
    torch.manual_seed(0)
    norm = RunningNorm(3, clip=2.0)
    norm.update(torch.randn(20, 3))
    assert norm(torch.tensor([[100.0, -100.0, 0.0]])).abs().max() <= 2.0
    net = GradientMLP(x_dim=4, delta_dim=3, n_modes=1, rank=4, input_clip=5.0)
    net.update_stats(torch.randn(30, 4) + 1, torch.randn(30, 3) * 0.1 + 0.05)
    with torch.no_grad():
        for layer in net.layers:  # a trained-looking network: biases and a non-zero residual branch
            layer.u.normal_()
            layer.bias.normal_()
    x, zero = torch.randn(5, 4), torch.zeros(5, 3)
    # A zero output gradient writes nothing when anchored; the reference's network writes its
    # constant response, the same for every edit.
    assert torch.equal(net(x, zero, mode=0, anchored=True)[1], torch.zeros(5, 3))
    assert net(x, zero, mode=0)[1].abs().max() > 0.1
    delta = torch.randn(5, 3)
    assert torch.equal(net(x, delta, mode=0, anchored=True)[0], net(x, delta, mode=0)[0])


def test_factors_on_functional_weights_are_those_of_the_written_model(vlm):
    """`train_sequence` takes later gradients on functional weights; `apply` on the written ones."""
    editor = MEND(targets=["ffn:-2", "ffn:-1"], rank=8, edit_lr=1e-2, anchored=True, input_clip=5.0)
    editor.setup(vlm)
    linears = editor.linears(vlm)
    first, second = make_case(0), make_case(1)
    with torch.no_grad():
        updates = editor.updates(gradient_factors(vlm, linears, first.edits))
    edited = {name: m.weight.detach() + updates[name] for name, m in linears.items()}
    functional = gradient_factors(vlm, linears, second.edits, edited)
    before = state_copy(vlm)
    handle = editor.apply(vlm, [first])
    written = gradient_factors(vlm, linears, second.edits)
    handle.restore()
    assert not changed(vlm, before)
    for name, (x, delta) in written.items():
        torch.testing.assert_close(functional[name][0], x, msg=name)
        torch.testing.assert_close(functional[name][1], delta, msg=name)
    # Meta-training on sequences of two runs, differs from one-step and leaves the backbone alone.
    one_step = MEND(targets=["ffn:-2", "ffn:-1"], rank=8, edit_lr=1e-2)
    sequence = MEND(targets=["ffn:-2", "ffn:-1"], rank=8, edit_lr=1e-2, train_sequence=2)
    one_step.setup(vlm)
    sequence.setup(vlm)
    a = one_step.training_loss(vlm, [first, second])
    b = sequence.training_loss(vlm, [first, second])
    b["loss"].backward()
    assert not torch.equal(a["loss"], b["loss"])
    assert all(p.grad is not None for p in sequence.parameters())
    assert not changed(vlm, before)


def test_training_lowers_the_edit_loss_and_never_touches_the_backbone(vlm):
    cases = [make_case(i) for i in range(2)]
    editor = MEND(targets=["ffn:-2", "ffn:-1"], rank=16, edit_lr=1e-3, c_edit=1.0)
    editor.setup(vlm)
    before = state_copy(vlm)
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = editor.training_loss(vlm, cases)
        assert {"loss", "loss_edit", "loss_loc"} <= out.keys()
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None for p in editor.parameters())
        optimizer.step()
        losses.append(out["loss_edit"].item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert not changed(vlm, before)
    assert all(not p.requires_grad and p.grad is None for p in vlm.model.parameters())
    # The normalisation statistics followed the factors seen (8 steps x 2 cases).
    assert all(float(net.x_norm.count) > 16 for net in editor.nets.values())


def test_export_round_trips_and_another_backbone_is_refused(vlm, tmp_path):
    editor = MEND(targets=["ffn:-1"], rank=8)
    editor.setup(vlm)
    editor.training_loss(vlm, [make_case(0)])  # moves the statistics buffers
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.linspace(0, 0.1, p.numel()).view_as(p))
    path = editor.export(tmp_path / "mend.safetensors", vlm)
    fresh = MEND(targets=["ffn:-1"], rank=8, checkpoint=str(path))
    fresh.setup(vlm)
    saved = editor.state_dict()
    assert saved.keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    # The loaded editor edits exactly as the one that was exported.
    case = make_case(1)
    before = state_copy(vlm)
    handle = editor.apply(vlm, [case])
    edited = state_copy(vlm)
    handle.restore()
    handle = fresh.apply(vlm, [case])
    assert all(torch.equal(v, edited[k]) for k, v in vlm.model.state_dict().items())
    handle.restore()
    assert not changed(vlm, before)
    # A setting that changes what the networks compute but no shape is checked too.
    with pytest.raises(EditorCheckpointError, match="input_clip"):
        MEND(targets=["ffn:-1"], rank=8, input_clip=3.0, checkpoint=str(path)).setup(vlm)
    with pytest.raises(EditorCheckpointError, match="anchored"):
        MEND(targets=["ffn:-1"], rank=8, anchored=True, checkpoint=str(path)).setup(vlm)
    wider = LlavaVLM(tiny=TinySpec(hidden_size=48))
    with pytest.raises(EditorCheckpointError, match="another backbone"):
        MEND(targets=["ffn:-1"], rank=8, checkpoint=str(path)).setup(wider)
    # A backbone without the trained layers (ffn:-3 on a 2-layer model) is refused the same way.
    deeper = LlavaVLM(tiny=TinySpec(num_layers=3))
    deep_editor = MEND(targets=["ffn:-3"], rank=8)
    deep_editor.setup(deeper)
    path = deep_editor.export(tmp_path / "deep.safetensors", deeper)
    with pytest.raises(EditorCheckpointError, match="another backbone.*2 layers"):
        MEND(targets=["ffn:-3"], rank=8, checkpoint=str(path)).setup(vlm)


@pytest.mark.parametrize("k", [1, 3])
def test_apply_edits_in_order_and_restores_bit_for_bit(vlm, k):
    editor = MEND(targets=["ffn:-2", "ffn:-1"], rank=8, edit_lr=1e-2)
    editor.setup(vlm)
    for i in range(4):  # statistics as after some training, so the update is not the raw gradient
        editor.training_loss(vlm, [make_case(i)])
    cases = [make_case(i) for i in range(k)]
    before = state_copy(vlm)
    handle = editor.apply(vlm, cases)
    moved = changed(vlm, before)
    assert moved and all(".mlp." in name for name in moved)
    assert len(handle.stats["update_norms"]) == k
    after_sequence = state_copy(vlm)
    handle.restore()
    assert not changed(vlm, before)
    # Sequential = one case after another, each on the model the earlier ones left.
    handles = [editor.apply(vlm, [case]) for case in cases]
    assert all(torch.equal(v, after_sequence[k]) for k, v in vlm.model.state_dict().items())
    for h in reversed(handles):
        h.restore()
    assert not changed(vlm, before)
    # Under inference mode (how Lightning validates and tests) the edit still works and restores.
    with torch.inference_mode():
        handle = editor.apply(vlm, cases)
    assert changed(vlm, before)
    handle.restore()
    assert not changed(vlm, before)


def test_bad_settings_and_groups_without_linear_weights_are_refused(vlm):
    with pytest.raises(ValueError, match="rank"):
        MEND(rank=0)
    with pytest.raises(ValueError, match="edit_lr"):
        MEND(edit_lr=0)
    with pytest.raises(ValueError, match="input_clip"):
        MEND(input_clip=0)
    with pytest.raises(ValueError, match="train_sequence"):
        MEND(train_sequence=0)
    with pytest.raises(ValueError, match="nn.Linear"):
        # The vision tower's position table is a 2-D weight of an nn.Embedding, not of a Linear.
        MEND(targets=["lm_head", "vision"]).setup(vlm)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_trains_edits_and_restores(family):
    vlm = FAMILIES[family]()
    vlm.requires_grad_(False)
    # The settings of configs/train/mend.yaml (clip, anchored) on top of the reference's networks.
    editor = MEND(targets=["ffn:-2", "ffn:-1"], rank=8, edit_lr=1e-2, input_clip=5.0, anchored=True)
    editor.setup(vlm)
    assert editor.log_lrs and editor.nets
    out = editor.training_loss(vlm, [make_case(0)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in editor.parameters())
    before = state_copy(vlm)
    handle = editor.apply(vlm, [make_case(0), make_case(1)])
    assert changed(vlm, before)
    handle.restore()
    assert not changed(vlm, before), family


def test_configs_name_mend_and_the_same_export():
    train = yaml.safe_load((ROOT / "configs" / "train" / "mend.yaml").read_text())
    edit = yaml.safe_load((ROOT / "configs" / "edit" / "mend.yaml").read_text())
    editor = train["model"]["init_args"]["editor"]
    assert editor["class_path"] == "editors.mend.MEND" == edit["model"]["editor"]["class_path"]
    export = train["model"]["init_args"]["export_path"]
    assert edit["model"]["editor"]["init_args"]["checkpoint"] == export
    # The edit config builds the same networks as were trained (the checkpoint's shapes).
    for key in ("targets", "rank", "n_hidden", "input_clip", "anchored"):
        assert edit["model"]["editor"]["init_args"][key] == editor["init_args"][key], key


def test_train_py_fits_mend_and_edit_py_loads_the_export(tmp_path):
    """`train.py fit` (EditorTraining) trains MEND on the tiny world, exports it, `edit.py test` loads it."""
    world = tmp_path / "world"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), world, verbose=False)
    backbone = {
        "class_path": "world.backbones.WorldLlavaVLM",
        "init_args": {
            "world_dir": str(world),
            "spec": {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32, "vision_layers": 1},
        },
    }
    data = {
        "format": "mmedit_vqa",
        "prompt_template": "{}",
        "loc_image_template": "{}",
        "image_root": str(world / "images"),
    }
    editor = {"targets": ["ffn:-2", "ffn:-1"], "rank": 8}
    export = tmp_path / "mend.safetensors"
    train = {
        "trainer": {
            "max_epochs": 2,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/rel", "mode": "max"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_modules.editor_training.EditorTraining",
            "init_args": {
                "backbone": backbone,
                "editor": {"class_path": "editors.mend.MEND", "init_args": {**editor, "edit_lr": 1e-3}},
                "export_path": str(export),
            },
        },
        "data": {
            "class_path": "datamodules.editor_data.EditorTrainData",
            "init_args": {
                **data,
                "train_file": str(world / "mmedit" / "vqa_train.json"),
                "val_file": str(world / "mmedit" / "vqa_val.json"),
                "batch_size": 2,
                "train_limit": 4,
                "val_limit": 2,
            },
        },
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    train_main(["fit", "--config", str(tmp_path / "train.yaml")])
    assert export.is_file()
    config = {
        "model": {
            "backbone": backbone,
            "editor": {"class_path": "editors.mend.MEND", "init_args": {**editor, "checkpoint": str(export)}},
        },
        "data": {**data, "annotation_file": str(world / "mmedit" / "vqa_eval.json"), "limit": 2},
    }
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(config))
    cli = edit.main(
        [
            "test",
            "--config", str(tmp_path / "edit.yaml"),
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--results_dir", str(tmp_path / "results"),
        ]
    )  # fmt: skip
    # The trained statistics (buffers) came back with the weights: the editor is the exported one.
    assert all(float(net.x_norm.count) > 0 for net in cli.model.editor.nets.values())
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["editor"]["checkpoint"] == str(export)
