"""Knowledge attribution (Dai et al., ACL 2022): integrated gradients over the FFN's hidden neurons.

A neuron here is one hidden unit of a language layer's FFN: an input of `FfnPorts.value_linear`
(`down_proj`, OPT's `fc2`), whose weight column is the value vector the unit writes into the
residual stream. Its attribution for predicting `token` at `position` is the integrated gradient
of p(token) along the straight path from a zero activation to its actual one, with every other
neuron and position left as they are:

    Attr(w_i) = a_i * (1/m) * sum_{k=1..m} d p(token | a_i := k/m * a_i) / d a_i

(a right Riemann sum of m = 20 steps, as the reference). The m scaled copies of a layer's
activation run as the m rows of one batch, so a layer costs one forward and one backward. Coarse
neurons are those above `threshold` x the largest attribution of the prompt (0.2); refinement
keeps the coarse neurons that at least a `share` of the fact's prompts agree on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backbones.base import VLM
from backbones.batching import ProbeBatch
from core.case import Probe
from editors.tuning import only_these_trainable

Neuron = tuple[int, int]  # (non-negative layer index, hidden unit)


@torch.no_grad()
def ffn_activations(vlm: VLM, batch: ProbeBatch, layers: Sequence[int]) -> dict[int, Tensor]:
    """Each layer's hidden FFN activation (the value projection's input) over `batch`, [B, T, I]."""
    shape = batch.inputs["input_ids"].shape
    captured: dict[int, Tensor] = {}
    hooks = []
    for layer in layers:

        def read(_m: nn.Module, args: tuple[Any, ...], layer: int = layer) -> None:
            captured[layer] = args[0].detach().reshape(*shape, -1)

        hooks.append(vlm.ffn_ports(layer).value_linear.register_forward_pre_hook(read))
    try:
        vlm.model(**batch.inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def integrated_gradients(
    vlm: VLM,
    probe: Probe,
    position: int,
    token: int,
    layers: Sequence[int],
    steps: int = 20,
) -> dict[int, Tensor]:
    """Attribution of every neuron of `layers` to p(`token`) at `position` of `probe`'s row, [I] per layer.

    `position` indexes the row `vlm.build_batch([probe])` builds (the logit there predicts the
    token after it); teacher forcing supplies the answer's earlier tokens.
    """
    if steps < 1:
        raise ValueError(f"integrated_gradients: steps must be >= 1, got {steps}")
    # Lightning tests run under inference mode, whose tensors autograd refuses to save.
    with torch.inference_mode(False):
        return _integrated_gradients(vlm, probe, position, token, layers, steps)


def _integrated_gradients(
    vlm: VLM, probe: Probe, position: int, token: int, layers: Sequence[int], steps: int
) -> dict[int, Tensor]:
    single = vlm.build_batch([probe])
    activations = ffn_activations(vlm, single, layers)
    batch = vlm.build_batch([probe] * steps)
    shape = batch.inputs["input_ids"].shape
    device = single.inputs["input_ids"].device
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    out: dict[int, Tensor] = {}
    with torch.enable_grad(), only_these_trainable(vlm.model, {}):
        for layer in layers:
            a = activations[layer][0, position]
            scaled = (alphas[:, None] * a.float()[None, :]).to(a.dtype).requires_grad_(True)

            def replace(_m: nn.Module, args: tuple[Any, ...], scaled: Tensor = scaled) -> tuple[Any, ...]:
                x = args[0]
                rows = x.reshape(*shape, -1)
                # Only this position's activation is scaled: mask it in rather than writing in
                # place, so autograd sees `scaled` as the input there.
                hit = torch.zeros(shape, dtype=torch.bool, device=x.device)
                hit[:, position] = True
                rows = torch.where(hit[..., None], scaled[:, None, :].expand_as(rows), rows)
                return (rows.reshape(x.shape), *args[1:])

            hook = vlm.ffn_ports(layer).value_linear.register_forward_pre_hook(replace)
            try:
                logits = vlm.model(**batch.inputs, use_cache=False).logits
            finally:
                hook.remove()
            prob = logits[:, position].float().softmax(-1)[:, token]
            (grad,) = torch.autograd.grad(prob.sum(), scaled)
            out[layer] = (a.float() * grad.float().mean(0)).detach()
    return out


def coarse_neurons(attributions: dict[int, Tensor], threshold: float) -> set[Neuron]:
    """Neurons whose attribution exceeds `threshold` x the largest one over all layers (none if it is <= 0)."""
    if not attributions:
        return set()
    top = max(float(a.max()) for a in attributions.values())
    if not top > 0 or math.isnan(top):
        return set()
    return {
        (layer, int(i))
        for layer, a in attributions.items()
        for i in (a > threshold * top).nonzero().flatten()
    }


def refine_neurons(per_prompt: Sequence[set[Neuron]], share: float) -> list[Neuron]:
    """Neurons that at least `share` of the prompts' coarse sets hold, sorted (layer, unit)."""
    if not per_prompt:
        return []
    counts: dict[Neuron, int] = {}
    for neurons in per_prompt:
        for neuron in neurons:
            counts[neuron] = counts.get(neuron, 0) + 1
    need = share * len(per_prompt)
    return sorted(n for n, c in counts.items() if c >= need - 1e-9)
