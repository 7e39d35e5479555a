"""Read the pre-attention hidden state of chosen language layers at chosen positions of a batch.

UniKE's knowledge states (Section 3.3) and its latent in-context editing (Section 3.2) live at the same
place: the `hidden_states` input of a layer's self-attention module, i.e. after the layer's input norm
(`AttentionParts.module`). Reading them there, and nowhere else, is what lets the stored states be
compared with what the latent-knowledge hook sees at edit time.

The forward is cut short once the deepest wanted layer has been read: the rest of the model (that
layer's attention and FFN, the final norm, a 32k-wide `lm_head` over every position) would only be
thrown away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from backbones.base import VLM
from backbones.batching import ProbeBatch


class _EnoughRead(Exception):
    """Raised from the deepest wanted layer's hook to end the forward early (never escapes `read_states`)."""


def normalise_layer(vlm: VLM, layer: int) -> int:
    """`layer` as a non-negative index into the language layers (refused when out of range)."""
    n = vlm.num_language_layers
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the language model has {n} layers")
    return layer % n


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("the attention module was called without a hidden_states tensor to read")
    return hidden


@contextlib.contextmanager
def _pre_attention_hooks(
    vlm: VLM,
    layers: Sequence[int],
    positions: dict[str, torch.Tensor],
    out: dict[str, dict[int, torch.Tensor]],
) -> Iterator[None]:
    """Hooks that copy `hidden_states[row, positions[name][row]]` of each layer into `out[name][layer]`."""
    deepest = max(normalise_layer(vlm, layer) for layer in layers)
    handles = []
    for layer in layers:
        module: nn.Module = vlm.attention_parts(layer).module
        stop = normalise_layer(vlm, layer) == deepest

        def hook(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer, stop: bool = stop) -> None:
            hidden = _hidden_states(args, kwargs)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            for name, cols in positions.items():
                out[name][layer] = hidden[rows, cols.to(hidden.device)].float()
            if stop:
                raise _EnoughRead

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_states(
    vlm: VLM, batch: ProbeBatch, layers: Sequence[int], positions: dict[str, torch.Tensor]
) -> dict[str, dict[int, torch.Tensor]]:
    """One forward of a built batch; returns `{name: {layer: [B, H] float32}}` at each row's position.

    `positions[name]` holds one column index per row. Layer keys are the ints given in `layers`.
    """
    if not layers:
        raise ValueError("read_states needs at least one layer")
    out: dict[str, dict[int, torch.Tensor]] = {name: {} for name in positions}
    with _pre_attention_hooks(vlm, layers, positions, out), contextlib.suppress(_EnoughRead):
        # The backbone's own forward (as scoring runs it), without a key/value cache: nothing is
        # decoded after this pass.
        vlm.logits(batch, use_cache=False)
    missing = [layer for layer in layers if any(layer not in out[name] for name in positions)]
    if missing:
        raise RuntimeError(f"the forward never reached the attention of layer(s) {missing}")
    return out
