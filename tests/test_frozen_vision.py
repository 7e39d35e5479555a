"""Frozen vision modules run once per FT case (backbones/frozen_vision.py), with every number unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case
from tiny_families import FAMILIES
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from backbones.frozen_vision import frozen_roots, reuse_frozen_outputs
from editors import FineTune


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * scale


def test_same_inputs_reuse_the_output_anything_else_runs() -> None:
    module = Counting().requires_grad_(False)
    x = torch.randn(2, 3)
    with reuse_frozen_outputs([module]) as (memo,):
        first = module(x)
        assert torch.equal(module(x), first) and module.calls == 1
        assert torch.equal(module(x.clone()), first) and module.calls == 1  # equal values are enough
        assert not torch.equal(module(x, scale=2.0), first) and module.calls == 2  # other arguments
        assert torch.equal(module(x), first) and module.calls == 3
        x.add_(1.0)  # the input changed in place: its features are not the same any more
        assert not torch.equal(module(x), first) and module.calls == 4
        assert not torch.equal(module(x + 1e-6), first) and module.calls == 5
        out = module(x + 1e-6)  # reused
        out.mul_(0.0)  # someone changed the output in place: it is not handed out again
        assert module(x + 1e-6).abs().sum() > 0 and module.calls == 6
        assert memo.hits == 3
    assert "forward" not in module.__dict__  # the class's forward is back
    module(x)
    module(x)
    assert module.calls == 8


def test_a_reused_output_comes_in_a_fresh_container() -> None:
    class Tower(nn.Module):
        def forward(self, x: torch.Tensor) -> BaseModelOutputWithPooling:
            return BaseModelOutputWithPooling(last_hidden_state=x * 2, pooler_output=x.sum(-1))

    tower, x = Tower(), torch.randn(2, 3)
    with reuse_frozen_outputs([tower]) as (memo,):
        out = tower(x)
        pooled = out.pooler_output
        out.pooler_output = torch.zeros(2)  # what BLIP-2 does with its vision output
        again = tower(x)
        assert memo.hits == 1 and again.pooler_output is pooled


def test_only_frozen_modules_are_watched() -> None:
    trained, frozen = Counting(), Counting().requires_grad_(False)
    mixed = nn.Sequential(Counting(), Counting().requires_grad_(False))
    roots = frozen_roots([trained, frozen, mixed, nn.Parameter(torch.zeros(1))])
    assert roots == [frozen, mixed[1]]
    assert frozen_roots([nn.ModuleList([frozen])]) == [frozen]  # containers are never called themselves


def run_ft(vlm, targets: list[str], cache: bool, monkeypatch: pytest.MonkeyPatch):
    losses: list[torch.Tensor] = []
    batch_loss = type(vlm).batch_loss

    def recording(batch):
        loss = batch_loss(vlm, batch)
        losses.append(loss.detach().clone())
        return loss

    with monkeypatch.context() as patch:
        patch.setattr(vlm, "batch_loss", recording)
        handle = FineTune(targets, lr=5e-2, steps=3, cache_frozen=cache).apply(
            vlm, [make_case(0), make_case(1)]
        )
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    handle.restore()
    return losses, state, handle.stats


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ft_vis_is_bit_identical_and_skips_the_tower(name, monkeypatch) -> None:
    vlm = FAMILIES[name]()
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    losses, state, stats = run_ft(vlm, ["projector"], True, monkeypatch)
    plain_losses, plain_state, plain_stats = run_ft(vlm, ["projector"], False, monkeypatch)
    assert len(losses) == len(plain_losses) == 2 * 4
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses, strict=True))
    assert any(not torch.equal(state[k], before[k]) for k in state), "the edit moved nothing"
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    # Three of the four forwards per case take the tower's features from the first.
    assert all(c["frozen_outputs_reused"] >= 3 for c in stats["cases"]), stats["cases"]
    assert all(c["frozen_outputs_reused"] == 0 for c in plain_stats["cases"])
    assert all(torch.equal(v, before[k]) for k, v in vlm.model.state_dict().items())


def test_a_trained_tower_is_not_reused(tiny_llava, monkeypatch) -> None:
    _, _, stats = run_ft(tiny_llava, ["vision"], True, monkeypatch)
    # The projector is frozen but its input (the tower's output) changes with every step.
    assert all(c["frozen_outputs_reused"] == 0 for c in stats["cases"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ft_llm_reuses_the_replayed_layers_attention(name, monkeypatch) -> None:
    vlm = FAMILIES[name]()
    _, state, stats = run_ft(vlm, ["ffn:-1"], True, monkeypatch)
    _, plain_state, _ = run_ft(vlm, ["ffn:-1"], False, monkeypatch)
    # The last layer is replayed; its attention (frozen, same input every step) is not recomputed.
    assert all(c["replayed_from_layer"] == vlm.num_language_layers - 1 for c in stats["cases"])
    assert all(c["frozen_outputs_reused"] >= 3 for c in stats["cases"]), stats["cases"]
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
