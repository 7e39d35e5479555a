"""SERAC: training lowers its loss, its export round-trips, routing decides who answers, the backbone is untouched.

Tiny randomly initialised backbones and in-memory cases (`conftest.make_case`). Routing tests swap
the trained classifier for an oracle over the same frozen features ("the probe's features are the
edit's own"), so what is checked is the real feature pipeline, memory and router: under
`image_text` routing an image-locality question worded like the edit about another picture stays
with the backbone; under `text` routing its features are the edit's, so it goes to the
counterfactual model, as in the public SERAC.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_case, solid_image
from tiny_families import FAMILIES
from torch import nn
from torch.nn import functional as F

from backbones import LlavaVLM, TinySpec
from core.case import EditCase, Probe
from editors.checkpoint import EditorCheckpointError
from editors.serac import SERAC, MemoryProbe, SeracRouter
from editors.serac_scope import ScopeFeatures, scope_features
from editors.serac_scope_report import scope_report
from lightning_modules.edit_loop import LoopSettings, edit_and_score

#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def cases_with_distinct_edits(n: int) -> list[EditCase]:
    """`make_case`s whose edits differ in picture and wording, with an image-locality probe worded like the edit."""
    out = []
    for i in range(n):
        case = make_case(i)
        image = solid_image((40 * i % 256, 200 - 30 * i, 60 + 50 * i % 200), (48, 40))
        edit = replace(case.edit, prompt=f"Where is landmark {i}?", image=image)
        probes = {k: list(v) for k, v in case.probes.items()}
        probes["rel"] = [edit]
        probes["t_gen"] = [replace(probes["t_gen"][0], image=image)]
        probes["i_gen"] = [replace(probes["i_gen"][0], prompt=edit.prompt)]
        # Same words as the edit, another picture: in scope for a text-only classifier.
        probes["i_loc"] = [Probe(edit.prompt, "blue", solid_image((20, 20, 220), (30, 30)), kind="i_loc")]
        out.append(replace(case, edit=edit, probes=probes))
    return out


class OracleScope(nn.Module):
    """In scope exactly when every feature kind matches the edit's: both absent, or the same vector."""

    def forward(self, routing: str, keys: ScopeFeatures, queries: ScopeFeatures) -> torch.Tensor:
        same = torch.ones(len(keys), len(queries), dtype=torch.bool)
        for m, k in keys.values.items():
            cos = F.normalize(k, dim=-1) @ F.normalize(queries.values[m], dim=-1).T
            kp, qp = keys.present[m][:, None], queries.present[m][None, :]
            same &= ((cos > 1 - 1e-5) & kp & qp) | (~kp & ~qp)
        return torch.where(same, 10.0, -10.0)


def state(vlm: LlavaVLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vlm.model.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], vlm: LlavaVLM) -> None:
    after = vlm.model.state_dict()
    assert before.keys() == after.keys()
    assert not [k for k in before if not torch.equal(before[k], after[k])]


# ----------------------------------------------------------------- training and checkpoints


def test_training_lowers_the_loss_and_leaves_the_backbone(vlm):
    torch.manual_seed(0)
    editor = SERAC()
    editor.setup(vlm)
    before = state(vlm)
    cases = cases_with_distinct_edits(4)
    optimizer = torch.optim.AdamW([p for p in editor.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        out = editor.training_loss(vlm, cases)
        assert {"loss", "loss_edit", "loss_loc", "loss_cls", "loss_cls_text", "cls_acc"} <= out.keys()
        assert all(torch.isfinite(v) for v in out.values())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in out.items()})
    assert losses[-1]["loss"] < losses[0]["loss"] - 0.1, (losses[0], losses[-1])
    assert losses[-1]["loss_cls"] < losses[0]["loss_cls"]
    assert_same(before, vlm)
    # Only the editor learns: the backbone's parameters never got a gradient.
    assert all(p.grad is None for p in vlm.model.parameters())


def test_export_round_trips_and_another_backbone_is_refused(vlm, tmp_path):
    torch.manual_seed(0)
    editor = SERAC(routing="text")
    editor.setup(vlm)
    out = editor.training_loss(vlm, cases_with_distinct_edits(2))
    out["loss"].backward()
    with torch.no_grad():
        for p in editor.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
    path = editor.export(tmp_path / "serac.safetensors", vlm)

    loaded = SERAC(routing="image_text", checkpoint=str(path))
    loaded.setup(vlm)
    mine, theirs = editor.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # The counterfactual model and both classifier heads are in the file.
    assert any(k.startswith("counterfactual.model.") for k in mine)
    assert any(k.startswith("scope.heads.image_text.") for k in mine)
    assert any(k.startswith("scope.heads.text.") for k in mine)

    other = LlavaVLM(tiny=TinySpec(hidden_size=48))
    with pytest.raises(EditorCheckpointError, match="serac.safetensors"):
        SERAC(checkpoint=str(path)).setup(other)


# ----------------------------------------------------------------- editing and routing


@pytest.mark.parametrize("mode", ["one_step", "sequential"])
def test_apply_and_restore_leave_the_backbone_bit_identical(vlm, mode):
    editor = SERAC()
    editor.setup(vlm)
    cf_before = {k: v.clone() for k, v in editor.counterfactual.model.state_dict().items()}
    before = state(vlm)
    records = edit_and_score(vlm, editor, cases_with_distinct_edits(3), LoopSettings(mode=mode))
    assert len(records) == 3 and all("scores" in r for r in records)
    assert_same(before, vlm)
    cf_after = editor.counterfactual.model.state_dict()
    assert all(torch.equal(cf_before[k], cf_after[k]) for k in cf_before)


@pytest.fixture
def oracle_editor(vlm) -> SERAC:
    editor = SERAC()
    editor.setup(vlm)
    editor.scope = OracleScope()
    # A counterfactual model that differs from the backbone, so the routing shows in the answers.
    with torch.no_grad():
        editor.counterfactual.lm_head().weight.add_(
            0.5 * torch.randn_like(editor.counterfactual.lm_head().weight)
        )
    return editor


def test_in_scope_probes_are_answered_by_the_counterfactual_model_with_the_edit(vlm, oracle_editor):
    case = cases_with_distinct_edits(1)[0]
    handle = oracle_editor.apply(vlm, [case])
    probes = handle.prepare(case.all_probes())
    router = handle.answerer(vlm)
    assert isinstance(router, SeracRouter)
    got = router.teacher_forced(probes)
    decisions = router.decide(probes)
    routed = {p.kind for p, d in zip(probes, decisions, strict=True) if d.entry is not None}
    assert "rel" in routed and "t_loc" not in routed and "i_loc" not in routed
    fmt = oracle_editor.context_format
    for probe, decision, out in zip(probes, decisions, got, strict=True):
        if decision.entry is not None:
            expected = oracle_editor.counterfactual.teacher_forced([fmt.ask(probe, fmt.fact(case.edit))])[0]
        else:
            expected = vlm.teacher_forced([probe])[0]
        assert torch.equal(out.pred, expected.pred), probe.kind
    # Locality probes are the unedited model's own answers.
    record = edit_and_score(vlm, oracle_editor, [case], LoopSettings())[0]
    assert record["scores"]["t_loc"] == 1.0 and record["scores"]["i_loc"] == 1.0
    handle.restore()


def test_text_routing_sends_image_locality_worded_like_the_edit_to_the_counterfactual_model(
    vlm, oracle_editor
):
    cases = cases_with_distinct_edits(2)
    routed = {}
    for routing in ("image_text", "text"):
        oracle_editor.routing = routing
        report = scope_report(oracle_editor, vlm, cases, memory=1)
        routed[routing] = report["routed"]
        assert report["routed"]["rel"] == 100.0 and report["routed"]["t_loc"] == 0.0
    assert routed["image_text"]["i_loc"] == 0.0
    assert routed["text"]["i_loc"] == 100.0
    # Sequential memory of both edits: each probe is matched to its own case's edit.
    oracle_editor.routing = "image_text"
    report = scope_report(oracle_editor, vlm, cases, memory=2)
    assert report["wrong_entry"] == 0 and report["precision"] == 100.0


def test_router_refuses_probes_not_prepared_by_a_handle(vlm):
    editor = SERAC()
    case = make_case(0)
    handle = editor.apply(vlm, [case])
    with pytest.raises(TypeError, match="handle.prepare"):
        handle.answerer(vlm).teacher_forced(case.all_probes())
    tagged = handle.prepare(case.all_probes())
    assert all(isinstance(p, MemoryProbe) and p.memory is handle.memory for p in tagged)
    assert all(isinstance(p, MemoryProbe) for p in (t.with_context(()) for t in tagged))


def test_features_see_the_picture_only_under_image_text_routing(vlm):
    case = make_case(0)
    image_text = scope_features(vlm, [case.edit], "image_text")
    text = scope_features(vlm, [case.edit], "text")
    assert set(image_text.values) == {"image", "text", "question"} and bool(image_text.present["image"][0])
    assert set(text.values) == {"question"}
    # The question alone is the same view under both routings.
    assert torch.allclose(image_text.values["question"], text.values["question"])
    no_image = scope_features(vlm, case.probes["t_loc"], "image_text")
    assert not bool(no_image.present["image"][0])


def test_a_smaller_counterfactual_model(vlm):
    editor = SERAC(cf_layers=1, cf_trainable=["language"])
    editor.setup(vlm)
    assert editor.counterfactual.num_language_layers == 1 < vlm.num_language_layers
    out = editor.training_loss(vlm, cases_with_distinct_edits(2))
    out["loss"].backward()
    records = edit_and_score(vlm, editor, cases_with_distinct_edits(2), LoopSettings(generation=True))
    assert len(records) == 2


# ----------------------------------------------------------------- every family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builds_trains_edits_and_restores_on_every_family(family):
    model = FAMILIES[family]()
    model.requires_grad_(False)
    editor = SERAC()
    editor.setup(model)
    cases = cases_with_distinct_edits(2)
    out = editor.training_loss(model, cases)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    before = state(model)
    for mode in ("one_step", "sequential"):
        records = edit_and_score(model, editor, cases, LoopSettings(mode=mode, generation=True))
        assert len(records) == 2 and all("scores" in r for r in records), family
    assert_same(before, model)


# ----------------------------------------------------------------- train.py fit and edit.py test


def test_train_py_fits_exports_and_edit_py_loads_it(tmp_path):
    """The YAML path of configs/train/serac.yaml, at toy size: fit, export, then edit.py test loads the export."""
    import yaml
    from safetensors.torch import load_file

    import edit
    from train import main as train_main

    root = Path(__file__).resolve().parent.parent
    sample = root / "data" / "sample"
    backbone = {
        "class_path": "backbones.LlavaVLM",
        "init_args": {"tiny": {"hidden_size": 32, "num_layers": 2}},
    }
    editor = {"class_path": "editors.serac.SERAC", "init_args": {"cf_layers": 1}}
    config = {
        "trainer": {
            "max_epochs": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path)},
            },
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
                "editor": editor,
                "lr": 1e-3,
                "export_path": str(tmp_path / "serac.safetensors"),
            },
        },
        "data": {
            "class_path": "datamodules.editor_data.EditorTrainData",
            "init_args": {
                "train_file": str(sample / "mmedit" / "vqa_train.json"),
                "val_file": str(sample / "mmedit" / "vqa_eval.json"),
                "image_root": str(sample / "images"),
                "batch_size": 2,
                "train_limit": 4,
                "val_limit": 2,
            },
        },
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    train_main(["fit", "--config", str(tmp_path / "train.yaml")])
    exported = load_file(str(tmp_path / "serac.safetensors"))
    assert any(k.startswith("counterfactual.") for k in exported) and any(
        k.startswith("scope.") for k in exported
    )
    edit_config = {
        "model": {
            "backbone": backbone,
            "editor": {
                **editor,
                "init_args": {**editor["init_args"], "checkpoint": str(tmp_path / "serac.safetensors")},
            },
        },
        "data": {"limit": 2},
    }
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(edit_config, sort_keys=False))
    cli = edit.main(
        ["test", "--config", str(tmp_path / "edit.yaml"), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--results_dir", str(tmp_path / "results")]
    )  # fmt: skip
    loaded = cli.model.editor.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in exported.items())
    assert (tmp_path / "results" / "summary.json").exists()
