"""A handle decides how its probes are answered: a routing handle sends in-scope probes to a second model."""

from __future__ import annotations

import torch
from conftest import make_case

from backbones import LlavaVLM, TinySpec
from core.case import Probe
from editors.base import EditHandle, Editor
from editors.routing import RoutedAnswerer
from lightning_modules.edit_loop import LoopSettings, edit_and_score

IN_SCOPE = ("rel", "t_gen", "i_gen", "port")


class RoutingHandle(EditHandle):
    def __init__(self, router: RoutedAnswerer) -> None:
        super().__init__()
        self.router = router

    def answerer(self, vlm):
        return self.router


class RouteEditor(Editor):
    """Sends every probe about the edit to `counterfactual`; the base model answers the rest."""

    name = "route"
    side_by_side = True  # the edit lives in the handle: cases may be scored together

    def __init__(self, counterfactual: LlavaVLM) -> None:
        self.counterfactual = counterfactual
        self.routers: list[RoutedAnswerer] = []

    def apply(self, vlm, cases):
        router = RoutedAnswerer(lambda p: p.kind in IN_SCOPE, self.counterfactual, vlm)
        self.routers.append(router)
        return RoutingHandle(router)


def test_in_scope_probes_are_answered_by_the_second_model(tiny_llava):
    second = LlavaVLM(tiny=TinySpec(seed=7))
    cases = [make_case(i) for i in range(3)]
    editor = RouteEditor(second)
    before = {k: v.clone() for k, v in tiny_llava.model.state_dict().items()}
    records = edit_and_score(tiny_llava, editor, cases, LoopSettings(generation=True))

    assert len(records) == 3 and len(editor.routers) == 3
    scoped = sum(len(c.probes[k]) for c in cases for k in IN_SCOPE)
    # Each probe is routed once teacher-forced and once for generation.
    assert sum(r.routed["scoped"] for r in editor.routers) == 2 * scoped
    for case, record in zip(cases, records, strict=True):
        for kind, entries in record["predictions"].items():
            probes: list[Probe] = case.probes[kind]
            model = second if kind in IN_SCOPE else tiny_llava
            expected_tf = model.teacher_forced(probes)
            expected_gen = model.generate(probes)
            for probe, entry, tf, gen in zip(probes, entries, expected_tf, expected_gen, strict=True):
                assert entry["prompt"] == probe.prompt
                assert entry["tf_prediction"] == tiny_llava.tokenizer.decode(tf.pred.tolist())
                assert entry["generated"] == gen
        # The base model answers locality probes unchanged: locality is perfect.
        assert record["scores"]["t_loc"] == 1.0 and record["scores"]["i_loc"] == 1.0
    # The two models disagree somewhere, so the routing is visible in the predictions.
    rel_base = [tiny_llava.teacher_forced(c.probes["rel"])[0].pred for c in cases]
    rel_second = [second.teacher_forced(c.probes["rel"])[0].pred for c in cases]
    assert any(not torch.equal(a, b) for a, b in zip(rel_base, rel_second, strict=True))
    after = tiny_llava.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_router_keeps_the_callers_order(tiny_llava):
    second = LlavaVLM(tiny=TinySpec(seed=7))
    probes = [p for kind in ("t_loc", "rel", "i_loc", "t_gen") for p in make_case(0).probes[kind]]
    router = RoutedAnswerer(lambda p: p.kind in IN_SCOPE, second, tiny_llava)
    got = router.teacher_forced(probes)
    for probe, out in zip(probes, got, strict=True):
        model = second if probe.kind in IN_SCOPE else tiny_llava
        assert torch.equal(out.pred, model.teacher_forced([probe])[0].pred)
