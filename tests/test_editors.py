"""Editors on the tiny LLaVA: edits take, restore is bit for bit, IKE retrieves and places context."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_case, solid_image

from core.case import EditCase, Probe
from editors import IKE, EditHandle, FineTune

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
SUBJECTS = ["tower", "bridge", "statue", "temple", "castle", "harbour"]
CITIES = ["Oslo", "Paris", "Lima", "Cairo", "Quito", "Dakar"]


def distinct_case(i: int, answer: str | None = None) -> EditCase:
    """A case whose edit image, prompt and answer differ from every other index (retrieval needs that)."""
    img = solid_image(PALETTE[i], (36 + 4 * i, 40))
    loc_img = solid_image(PALETTE[-1 - i], (30, 30))
    prompt = f"Which city holds this {SUBJECTS[i]}?"
    target = answer or CITIES[i]
    edit = Probe(prompt, target, img, kind="rel")
    probes = {
        "rel": [edit],
        "t_gen": [Probe(f"Name the city of this {SUBJECTS[i]}.", target, img, kind="t_gen")],
        "i_gen": [Probe(prompt, target, solid_image(PALETTE[i], (50, 30)), kind="i_gen")],
        "t_loc": [Probe(f"What is {i} plus {i}?", str(2 * i), None, kind="t_loc")],
        "i_loc": [Probe("What colour is this?", "blue", loc_img, kind="i_loc")],
        "port": [],
    }
    return EditCase(case_id=f"train-{i}", index=i, edit=edit, probes=probes, source="memory")


@pytest.fixture
def pool() -> list[EditCase]:
    return [distinct_case(i) for i in range(4)]


def make_editor(method: str, pool: list[EditCase]):
    if method == "ft_llm":
        return FineTune(["ffn:-1"], lr=5e-2, steps=2, name="FT (LLM)")
    if method == "ft_vis":
        return FineTune(["projector"], lr=5e-2, steps=2, name="FT (Vis)")
    return IKE.from_cases(pool, k=4)


def state_copy(vlm) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    tensors = {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in vlm.model.named_parameters()}
    return tensors, flags


def assert_same_state(vlm, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    tensors, flags = before
    after = vlm.model.state_dict()
    assert after.keys() == tensors.keys()
    changed = [k for k, v in after.items() if not torch.equal(v, tensors[k])]
    assert not changed, f"not restored bit for bit: {changed[:5]}"
    assert {n: p.requires_grad for n, p in vlm.model.named_parameters()} == flags
    assert all(p.grad is None for p in vlm.model.parameters())


def score_everything(vlm, handle: EditHandle, cases: list[EditCase]) -> None:
    """What the evaluation loop does between apply and restore."""
    probes = handle.prepare([p for c in cases for p in c.all_probes()])
    vlm.teacher_forced(probes)


# ----------------------------------------------------------------- every method: isolation
@pytest.mark.parametrize("method", ["ft_llm", "ft_vis", "ike"])
@pytest.mark.parametrize("k_cases", [1, 3])
def test_apply_restore_is_bit_exact(tiny_llava, pool, method, k_cases):
    # A frozen vision tower is the common real set-up: its flags must survive the edit too.
    for p in tiny_llava.vision_modules()[0].parameters():
        p.requires_grad_(False)
    editor = make_editor(method, pool)
    editor.setup(tiny_llava)
    cases = [distinct_case(i, answer=f"New {i}") for i in range(k_cases)]
    before = state_copy(tiny_llava)
    handle = editor.apply(tiny_llava, cases)
    assert {n: p.requires_grad for n, p in tiny_llava.model.named_parameters()} == before[1]
    assert not tiny_llava.model.training
    score_everything(tiny_llava, handle, cases)
    handle.restore()
    assert_same_state(tiny_llava, before)
    assert isinstance(handle.stats, dict) and handle.stats["time_s"] >= 0


# ----------------------------------------------------------------- FT
@pytest.mark.parametrize("targets", [["ffn:-1"], ["projector"]])
def test_finetune_lowers_edit_loss_and_moves_only_targets(tiny_llava, cases, targets):
    params = tiny_llava.parameter_group(*targets)
    before = state_copy(tiny_llava)
    with torch.no_grad():
        loss_before = tiny_llava.loss(cases[0].edits).item()
    handle = FineTune(targets, lr=5e-2, steps=5).apply(tiny_llava, cases[:1])
    with torch.no_grad():
        loss_after = tiny_llava.loss(cases[0].edits).item()
    assert loss_after < loss_before
    changed = {k for k, v in tiny_llava.model.state_dict().items() if not torch.equal(v, before[0][k])}
    assert changed and changed <= set(params)
    assert handle.stats["steps"] == 5 and handle.stats["cases"][0]["case_id"] == cases[0].case_id
    assert handle.stats["final_loss"] == pytest.approx(loss_after, rel=1e-5)
    handle.restore()
    assert_same_state(tiny_llava, before)


def test_finetune_reaches_reliability(tiny_llava):
    # Every answer token follows a distinct one, so the last MLP alone can separate the positions.
    case = distinct_case(1)
    handle = FineTune(["ffn:-1"], lr=5e-2, steps=12).apply(tiny_llava, [case])
    out = tiny_llava.teacher_forced([case.edit])[0]
    assert (out.pred == out.labels).float().mean().item() == 1.0
    handle.restore()


def test_finetune_stop_loss_records_steps_used(tiny_llava, cases):
    handle = FineTune(["ffn:-1"], lr=5e-2, steps=15, stop_loss=1e9).apply(tiny_llava, cases[:2])
    assert handle.stats["steps"] == 0
    assert all(c["stopped_early"] and c["steps"] == 0 for c in handle.stats["cases"])
    initial = handle.stats["cases"][0]["initial_loss"]
    handle = FineTune(["ffn:-1"], lr=5e-2, steps=15, stop_loss=initial - 0.3).apply(tiny_llava, cases[:1])
    used = handle.stats["cases"][0]
    assert 0 < used["steps"] < 15 and used["final_loss"] < initial - 0.3
    handle.restore()


def test_finetune_keeps_training_mode_and_sequence_restores_to_start(tiny_llava, cases):
    tiny_llava.model.train()
    before = state_copy(tiny_llava)
    handle = FineTune(["ffn:-1"], lr=5e-2, steps=2, optimizer="sgd").apply(tiny_llava, cases)
    assert tiny_llava.model.training
    assert len(handle.stats["cases"]) == 3
    handle.restore()
    assert_same_state(tiny_llava, before)


def test_finetune_works_inside_inference_mode(tiny_llava, cases):
    # Lightning's test loop runs under inference mode; the edit must still get gradients.
    before = state_copy(tiny_llava)
    with torch.inference_mode():
        handle = FineTune(["ffn:-1"], lr=5e-2, steps=2).apply(tiny_llava, cases[:1])
        assert handle.stats["steps"] == 2
        handle.restore()
    assert_same_state(tiny_llava, before)


def test_finetune_failure_mid_sequence_leaves_model_untouched(tiny_llava, cases):
    before = state_copy(tiny_llava)
    bad = make_case(9)
    bad.edit = replace(bad.edit, image=solid_image((0, 0, 0)), prompt="no image token <image> here")
    with pytest.raises(ValueError):
        FineTune(["ffn:-1"], lr=5e-2, steps=2).apply(tiny_llava, [cases[0], bad])
    assert_same_state(tiny_llava, before)


def test_finetune_rejects_bad_settings():
    with pytest.raises(ValueError, match="targets"):
        FineTune([], lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        FineTune(["ffn:-1"], optimizer="adam")  # type: ignore[arg-type]


# ----------------------------------------------------------------- IKE
def test_ike_prepared_probes_carry_demos_and_fact(tiny_llava, pool):
    editor = IKE.from_cases(pool, k=4)
    case = make_case(0)
    handle = editor.apply(tiny_llava, [case])
    probes = case.all_probes()
    prepared = handle.prepare(probes)
    for raw, probe in zip(probes, prepared, strict=True):
        assert len(probe.context) == 5
        assert all(item.text.startswith("New Fact:") for item in probe.context)
        assert probe.context[-1].text == f"New Fact: {case.edit.prompt} {case.edit.answer}"
        assert probe.context[-1].image is case.edit.image
        assert (
            probe.prompt == f"Prompt: {raw.prompt}"
            and probe.answer == raw.answer
            and probe.image is raw.image
        )
    demos = prepared[0].context[:4]
    assert sum(item.image is not None for item in demos) >= 3
    with torch.no_grad():
        assert tiny_llava.loss(prepared[:1]).item() != tiny_llava.loss(probes[:1]).item()
    tf_raw = tiny_llava.teacher_forced(probes)
    tf_ike = tiny_llava.teacher_forced(prepared)
    assert [len(t.labels) for t in tf_raw] == [len(t.labels) for t in tf_ike]
    assert handle.stats["retrieved"][0] and len(handle.stats["retrieved"][0]) == 4


def test_ike_retrieves_the_most_similar_training_record(tiny_llava, pool):
    editor = IKE.from_cases(pool, k=3)
    # The edit shares record 2's image and prompt but writes a different answer.
    case = distinct_case(2, answer="Bergen")
    handle = editor.apply(tiny_llava, [case])
    retrieved = handle.stats["retrieved"][0]
    assert [r["record"] for r in retrieved] == ["train-2"] * 3
    assert [r["kind"] for r in retrieved] == ["copy", "update", "retain"]
    context = handle.prepare([case.edit])[0].context
    assert (
        context[0].text
        == "New Fact: Which city holds this statue? Lima\nPrompt: Which city holds this statue? Lima"
    )
    assert context[0].image is pool[2].edit.image
    assert context[2].image is pool[2].locality_probes()[2 % 2].image  # retain alternates loc kinds

    # With k=4 a second record joins, and the most similar record sits next to the new fact.
    four = IKE.from_cases(pool, k=4).apply(tiny_llava, [case]).stats["retrieved"][0]
    assert [r["record"] for r in four[1:]] == ["train-2"] * 3 and four[0]["record"] != "train-2"


def test_ike_sequential_gives_each_probe_its_nearest_fact(tiny_llava, pool):
    editor = IKE.from_cases(pool, k=2)
    cases = [distinct_case(i, answer=f"New {i}") for i in (3, 0, 1)]
    handle = editor.apply(tiny_llava, cases)
    prepared = handle.prepare([c.edit for c in cases])
    for case, probe in zip(cases, prepared, strict=True):
        facts = [
            item for item in probe.context if item.text.startswith("New Fact:") and "\n" not in item.text
        ]
        assert [f.text for f in facts] == [f"New Fact: {case.edit.prompt} {case.edit.answer}"]
        assert facts[0].image is case.edit.image
        assert len(probe.context) == 3
    assert handle.stats["assigned"] == [c.case_id for c in cases]


def test_ike_shows_every_fact_of_a_case_and_text_only_demos(tiny_llava, pool):
    case = distinct_case(0, answer="New 0")
    case.extra_edits = [Probe("Which country is Oslo in?", "Chile", None, kind="rel")]
    editor = IKE.from_cases(pool, k=3, demo_images=False)
    probe = editor.apply(tiny_llava, [case]).prepare([case.edit])[0]
    assert [item.text for item in probe.context[-2:]] == [
        f"New Fact: {case.edit.prompt} New 0",
        "New Fact: Which country is Oslo in? Chile",
    ]
    assert all(item.image is None for item in probe.context[:3])


def test_ike_pool_is_embedded_once_per_backbone(tiny_llava, pool, monkeypatch):
    editor = IKE.from_cases(pool, k=2)
    editor.setup(tiny_llava)
    calls = []
    monkeypatch.setattr(
        tiny_llava, "embed", lambda probes: calls.append(len(probes)) or torch.ones(len(probes), 32)
    )
    editor.setup(tiny_llava)
    editor.apply(tiny_llava, [distinct_case(0)])
    assert calls == [1]  # only the edit itself, not the pool again


def test_ike_needs_a_pool_source(tiny_llava):
    with pytest.raises(ValueError, match="train_file"):
        IKE(k=2).setup(tiny_llava)
    with pytest.raises(ValueError, match="demo_format"):
        IKE.from_cases([], demo_format="{prompt}")


def test_ike_reads_its_pool_with_the_dataset_loader(tiny_llava, tmp_path):
    pytest.importorskip("datamodules.dataset")
    for name, color in [("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("c.png", (0, 0, 200))]:
        solid_image(color, (32, 32)).save(tmp_path / name)
    record = {
        "src": "What is this?",
        "alt": "a kite",
        "pred": "a bird",
        "rephrase": "What is shown here?",
        "image": "a.png",
        "image_rephrase": "b.png",
        "loc": "Who wrote Hamlet?",
        "loc_ans": "Shakespeare",
        "m_loc": "c.png",
        "m_loc_q": "What colour is this?",
        "m_loc_a": "blue",
    }
    train = tmp_path / "vqa_train.json"
    train.write_text(json.dumps([record, {**record, "alt": "a plane"}]))
    editor = IKE(train_file=str(train), image_root=str(tmp_path), k=3)
    editor.setup(tiny_llava)
    assert editor.describe()["pool_records"] == 2
    assert editor._demos[0][0].item.text == "New Fact: Question: What is this? Short answer: a kite\n" + (
        "Prompt: Question: What is this? Short answer: a kite"
    )
    assert [d.kind for d in editor._demos[1]] == ["copy", "update", "retain"]
    handle = editor.apply(tiny_llava, [make_case(0)])
    assert len(handle.prepare([make_case(0).edit])[0].context) == 4
