"""FT that replays only the upper language layers (backbones/frozen_prefix.py) is the full FT, bit for bit.

On every tiny family: the replayed loss equals `vlm.loss` from every first layer; FT of the last
MLP, the last layer, the LM head or the whole language model gives the same per-step losses, edited
weights and scores with the cache on and off; vision-side and tied targets fall back to the whole
model; an adapter whose final modules are wrong is caught by the first-call check.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_case
from tiny_families import FAMILIES

import backbones.training_loss
from backbones.frozen_prefix import PrefixCachedLoss, first_trained_layer
from datamodules.edit_datamodule import EditDataModule
from editors import FineTune
from lightning_modules.edit_cli import edit_trainer
from lightning_modules.edit_eval import EditEval

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
TARGETS = [["ffn:-1"], ["layer:-1"], ["lm_head"], ["language"]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


def lm_head_tied(vlm) -> bool:
    return vlm.lm_head().weight is vlm.model.get_input_embeddings().weight


def some_probes(case):
    # An image probe, a text-only one and a second image size: padding, masks and mixed batches.
    return case.edits + case.probes["t_loc"] + case.probes["i_gen"]


def test_replayed_loss_is_the_full_loss_from_every_layer(family):
    name, vlm = family
    probes = some_probes(make_case(0))
    with torch.no_grad():
        full = vlm.loss(probes)
    for first in range(vlm.num_language_layers + 1):
        replay = PrefixCachedLoss(vlm, probes, first)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed check would warn and fall back
            with torch.no_grad():
                losses = [replay(), replay()]
        assert replay.cached, (name, first)
        assert all(torch.equal(loss, full) for loss in losses), (name, first, full, losses)


def test_replay_without_a_key_value_cache(tiny_llava, monkeypatch):
    # A model configured without a cache passes none to its layers; the replay then passes none.
    monkeypatch.setattr(tiny_llava.model.config.get_text_config(), "use_cache", False)
    probes = some_probes(make_case(0))
    with torch.no_grad():
        full = tiny_llava.loss(probes)
        replay = PrefixCachedLoss(tiny_llava, probes, 1)
        assert not replay._fresh_cache
        assert torch.equal(replay(), full) and replay.cached


def test_first_trained_layer_follows_the_parameter_groups(family):
    name, vlm = family
    n = vlm.num_language_layers

    def first(*groups: str) -> int | None:
        return first_trained_layer(vlm, vlm.parameter_group(*groups).values())

    assert first("ffn:-1") == n - 1
    assert first("layer:-1") == n - 1
    assert first("layer:0", "ffn:-1") == 0
    assert first("language") == 0
    # A tied LM head is also the input embedding table: training it changes the prefix.
    assert first("lm_head") == (None if lm_head_tied(vlm) else n)
    assert first("projector") is None
    assert first("vision") is None
    assert first("ffn:-1", "projector") is None


def run_ft(vlm, targets, cache, monkeypatch):
    """FT on two cases in sequence; per-step losses, edited state, scores and stats, then restore."""
    losses: list[torch.Tensor] = []

    class Recording(PrefixCachedLoss):
        def __call__(self):
            loss = super().__call__()
            losses.append(loss.detach().clone())
            return loss

    full_loss = type(vlm).batch_loss

    def recording_loss(batch):
        loss = full_loss(vlm, batch)
        losses.append(loss.detach().clone())
        return loss

    cases = [make_case(0), make_case(1)]
    with monkeypatch.context() as patch:
        patch.setattr(backbones.training_loss, "PrefixCachedLoss", Recording)
        patch.setattr(vlm, "batch_loss", recording_loss)
        editor = FineTune(targets, lr=5e-2, steps=3, cache_frozen=cache)
        handle = editor.apply(vlm, cases)
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    outputs = vlm.teacher_forced([p for c in cases for p in c.all_probes()])
    handle.restore()
    return losses, state, outputs, handle.stats


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
def test_cached_ft_is_bit_identical(family, targets, monkeypatch):
    name, vlm = family
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = run_ft(vlm, targets, True, monkeypatch)
    plain = run_ft(vlm, targets, False, monkeypatch)
    losses, state, outputs, stats = cached
    plain_losses, plain_state, plain_outputs, plain_stats = plain

    n = vlm.num_language_layers
    expected = {"ffn:-1": n - 1, "layer:-1": n - 1, "language": 0}.get(targets[0], n)
    if targets == ["lm_head"] and lm_head_tied(vlm):
        expected = None
    assert [c["replayed_from_layer"] for c in stats["cases"]] == [expected, expected], name
    assert [c["replayed_from_layer"] for c in plain_stats["cases"]] == [None, None]

    assert len(losses) == len(plain_losses) == 2 * 4  # (steps + 1) forwards per case
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses, strict=True)), (losses, plain_losses)
    changed = [k for k in state if not torch.equal(state[k], before[k])]
    assert changed, "the edit moved nothing"
    assert all(torch.equal(state[k], plain_state[k]) for k in state), name
    for a, b in zip(outputs, plain_outputs, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.labels, b.labels)
    for a, b in zip(stats["cases"], plain_stats["cases"], strict=True):
        assert (a["initial_loss"], a["final_loss"]) == (b["initial_loss"], b["final_loss"])
    # Restored bit for bit either way.
    assert all(torch.equal(v, before[k]) for k, v in vlm.model.state_dict().items())


@pytest.mark.parametrize("targets", [["projector"], ["vision"], ["ffn:-1", "projector"]])
def test_vision_side_targets_run_the_whole_model(tiny_llava, targets):
    handle = FineTune(targets, lr=5e-2, steps=2).apply(tiny_llava, [make_case(0)])
    assert handle.stats["cases"][0]["replayed_from_layer"] is None
    handle.restore()


def test_wrong_final_modules_are_caught_and_fall_back(tiny_llava, monkeypatch):
    # An adapter that forgot the final norm: the first replayed loss differs from the full one.
    case = make_case(0)
    plain = FineTune(["ffn:-1"], lr=5e-2, steps=2, cache_frozen=False).apply(tiny_llava, [case])
    edited = {k: v.clone() for k, v in tiny_llava.model.state_dict().items()}
    plain.restore()
    monkeypatch.setattr(tiny_llava, "final_modules", lambda: [tiny_llava.lm_head()])
    with pytest.warns(UserWarning, match="full forward"):
        handle = FineTune(["ffn:-1"], lr=5e-2, steps=2).apply(tiny_llava, [case])
    assert handle.stats["cases"][0]["replayed_from_layer"] is None
    assert handle.stats["cases"][0]["final_loss"] == plain.stats["cases"][0]["final_loss"]
    assert all(torch.equal(v, edited[k]) for k, v in tiny_llava.model.state_dict().items())
    handle.restore()


def test_no_final_modules_means_no_cache(tiny_llava, monkeypatch):
    monkeypatch.setattr(tiny_llava, "final_modules", lambda: None)
    assert first_trained_layer(tiny_llava, tiny_llava.parameter_group("ffn:-1").values()) is None
    handle = FineTune(["ffn:-1"], lr=5e-2, steps=1).apply(tiny_llava, [make_case(0)])
    assert handle.stats["cases"][0]["replayed_from_layer"] is None
    handle.restore()


@pytest.mark.parametrize("mode", ["one_step", "sequential"])
def test_scores_through_the_loop_are_identical(tiny_llava, mode, tmp_path):
    # The whole evaluation loop, as `edit.py test` runs FT (LLM): every summary score is the same.
    data_file = "mmedit/vqa_eval.json" if mode == "one_step" else "vlkeb/eval_multihop.json"
    summaries = []
    for cache in (True, False):
        data = EditDataModule(str(SAMPLE / data_file), str(SAMPLE / "images"), limit=3, batch_size=3)
        editor = FineTune(["ffn:-1"], lr=1e-2, steps=2, cache_frozen=cache, name="ft_llm")
        module = EditEval(tiny_llava, editor, mode=mode)
        edit_trainer(results_dir=str(tmp_path / str(cache))).test(module, datamodule=data, verbose=False)
        summaries.append(module.scores.compute())
    cached, plain = summaries
    assert cached.keys() == plain.keys()
    for key in cached:
        assert cached[key] == plain[key] or (math.isnan(cached[key]) and math.isnan(plain[key])), key
