"""Shared prompt prefixes run once from a KV cache score exactly like the plain forward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import make_case, solid_image
from PIL import Image
from tiny_families import FAMILIES

from backbones import VLM, ImageTextToTextVLM, LlavaVLM, TinySpec, prefix_cache
from backbones.prefix_cache import image_digest, plan_chunk, row_logits
from core.case import ContextItem, Probe
from editors import IKE
from lightning_modules.case_scoring import reference_outputs, score_cases

BUILDERS: dict[str, Callable[[], VLM]] = {
    **FAMILIES,
    "generic_llava": lambda: ImageTextToTextVLM(tiny=TinySpec(), family="llava"),
}
SHARING = sorted(name for name in BUILDERS if name != "qwen2_vl")


@pytest.fixture(autouse=True)
def share_any_saving(monkeypatch):
    # Tiny pictures take few tokens; test the mechanism even where the saving would not pay.
    monkeypatch.setattr(prefix_cache, "MIN_SAVING", 0.0)
    monkeypatch.setattr(prefix_cache, "MIN_SAVED_WORK", 0)


@pytest.fixture(scope="module", params=SHARING)
def vlm(request) -> VLM:
    backbone = BUILDERS[request.param]()
    assert backbone.supports_prefix_cache
    return backbone


def ike_style() -> list[Probe]:
    """One case's probes behind one in-context block: two demonstrations and the new fact, each with a picture."""
    edit = solid_image((200, 30, 30), (48, 40))
    context = (
        ContextItem("New Fact: Which city? Oslo\nPrompt: Which city? Oslo", solid_image((10, 200, 30))),
        ContextItem("New Fact: Which river? Nile\nPrompt: Where? Nile", solid_image((10, 30, 200), (32, 64))),
        ContextItem("New Fact: Where is this landmark? Rome", edit),
    )
    return [
        Probe("Prompt: Where is this landmark?", "Rome", edit, context=context),
        Probe("Prompt: In which city is it?", "Rome", edit, kind="t_gen", context=context),
        Probe(
            "Prompt: Where is this landmark?",
            "Rome",
            solid_image((190, 40, 35), (32, 64)),
            "i_gen",
            context=context,
        ),
        Probe("Prompt: Who wrote Hamlet?", "Shakespeare", None, "t_loc", context=context),
        Probe(
            "Prompt: What colour is this?",
            "blue",
            solid_image((20, 20, 220), (30, 30)),
            "i_loc",
            context=context,
        ),
    ]


def llava_style() -> list[Probe]:
    """Rel, T-Gen and Port share the edit picture (one of them as an equal copy, not the same object)."""
    edit = solid_image((200, 30, 30), (48, 40))
    return [
        Probe("Where is this landmark?", "Rome", edit),
        Probe("In which city is this landmark?", "Rome", edit, kind="t_gen"),
        Probe("Which country is this landmark in?", "Italy", edit.copy(), kind="port", hop=1),
        Probe("Where is this landmark?", "Rome", solid_image((190, 40, 35), (32, 64)), kind="i_gen"),
        Probe("Who wrote Hamlet?", "Shakespeare", None, kind="t_loc"),
    ]


def assert_same_outputs(vlm: VLM, probes: list[Probe], all_topk: int = 3) -> None:
    vlm.share_prefixes = False
    try:
        plain = vlm.teacher_forced(probes, all_topk=all_topk)
    finally:
        vlm.share_prefixes = True
    shared = vlm.teacher_forced(probes, all_topk=all_topk)
    for a, b in zip(plain, shared, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.labels, b.labels)
        assert a.all_topk is not None and b.all_topk is not None
        assert torch.equal(a.all_topk, b.all_topk)


def assert_logits_close(vlm: VLM, probes: list[Probe]) -> None:
    batch = vlm.build_batch(probes)
    with torch.inference_mode():
        full = vlm.logits(batch)
    for i, got in enumerate(row_logits(vlm, probes)):
        torch.testing.assert_close(got, full[i, : batch.lengths[i]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("probes", [ike_style, llava_style], ids=["ike_context", "shared_image"])
def test_sharing_changes_no_output(vlm: VLM, probes) -> None:
    batch_probes = probes()
    plan = plan_chunk(vlm, batch_probes)
    # The test is only worth something if a prefix really is shared.
    assert len(plan.shared()) >= 2
    assert_same_outputs(vlm, batch_probes)
    assert_logits_close(vlm, batch_probes)


def test_ike_context_is_one_prefix_for_the_whole_case(tiny_llava) -> None:
    # Every probe carries the same three pictures and facts; the one prefix worth running is the
    # whole in-context block, not the edit picture that only Rel and T-Gen add on top of it.
    plan = plan_chunk(tiny_llava, ike_style())
    assert plan.alone() == []
    assert len({id(node) for node in plan.prefixes}) == 1


def test_equal_tokens_different_pictures_are_not_merged(tiny_llava) -> None:
    red, blue = solid_image((200, 30, 30)), solid_image((30, 30, 200))
    probes = [
        Probe("What colour is this?", "red", red),
        Probe("What colour is this?", "blue", blue),
        Probe("Which colour?", "red", solid_image((200, 30, 30))),  # equal to `red`, another object
    ]
    ids = tiny_llava.build_batch(probes[:2]).inputs["input_ids"]
    assert torch.equal(ids[0, :20], ids[1, :20])  # same placeholder ids for both pictures
    plan = plan_chunk(tiny_llava, probes)
    assert plan.prefixes[1] is None
    assert plan.prefixes[0] is not None and plan.prefixes[0] is plan.prefixes[2]
    assert_same_outputs(tiny_llava, probes)


def test_image_digest_compares_content() -> None:
    red = solid_image((200, 30, 30))
    assert image_digest(red) == image_digest(red.copy()) == image_digest(solid_image((200, 30, 30)))
    assert image_digest(red) != image_digest(solid_image((200, 30, 31)))
    assert image_digest(red) != image_digest(solid_image((200, 30, 30), (30, 40)))
    # Palette images: same indices, different palettes, different pictures.
    a = Image.new("P", (4, 4), 0)
    b = a.copy()
    a.putpalette([255, 0, 0] * 256)
    b.putpalette([0, 0, 255] * 256)
    assert image_digest(a) != image_digest(b)


def test_nothing_shared_is_the_plain_forward(tiny_llava) -> None:
    probes = [Probe("Who wrote Hamlet?", "Shakespeare"), Probe("Where?", "Rome", solid_image((1, 2, 3)))]
    assert plan_chunk(tiny_llava, probes).shared() == []
    assert_same_outputs(tiny_llava, probes)


def test_small_savings_keep_the_plain_forward(tiny_llava, monkeypatch) -> None:
    monkeypatch.setattr(prefix_cache, "MIN_SAVING", 0.5)
    assert plan_chunk(tiny_llava, llava_style()).shared() == []
    assert len(plan_chunk(tiny_llava, ike_style()).shared()) == 5


def test_little_saved_work_keeps_the_plain_forward(tiny_llava, monkeypatch) -> None:
    # A share large enough, but too little work (tokens x width^2) to pay for two more forward calls.
    plan = plan_chunk(tiny_llava, ike_style())
    nodes = [node for node in plan.prefixes if node is not None]
    saved = sum(node.length for node in nodes) - sum({id(node): node.length for node in nodes}.values())
    work = saved * tiny_llava.model.config.text_config.hidden_size**2
    monkeypatch.setattr(prefix_cache, "MIN_SAVED_WORK", work + 1)
    assert plan_chunk(tiny_llava, ike_style()).shared() == []
    monkeypatch.setattr(prefix_cache, "MIN_SAVED_WORK", work)
    assert len(plan_chunk(tiny_llava, ike_style()).shared()) == 5


def test_option_and_capability() -> None:
    assert not FAMILIES["qwen2_vl"]().supports_prefix_cache
    off = LlavaVLM(tiny=TinySpec(), share_prefixes=False)
    assert off.supports_prefix_cache and not off.share_prefixes


def test_ike_scores_are_the_same_with_and_without_sharing(tiny_llava) -> None:
    """The whole scoring path (IKE contexts of three one-step cases in one pass, MMEdit-trainer protocol)."""
    cases = [make_case(i) for i in range(3)]
    editor = IKE.from_cases([make_case(10 + i) for i in range(3)], k=2)
    handles = [editor.apply(tiny_llava, [c]) for c in cases]

    def records(share: bool) -> list[dict]:
        tiny_llava.share_prefixes = share
        reference = reference_outputs(tiny_llava, cases, "mmedit_trainer", False)
        edited = list(zip(cases, handles, strict=True))
        return score_cases(tiny_llava, edited, reference, "mmedit_trainer", False)

    try:
        assert records(True) == records(False)
    finally:
        tiny_llava.share_prefixes = True
