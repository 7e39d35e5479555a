"""Replay only the upper language layers from cached inputs, for editors that train nothing below them.

FT (LLM) trains, say, the last layer's MLP: the vision tower, the projector, the embeddings and every
language layer below the first trained one then compute the same thing at every optimisation step.
`PrefixCachedLoss` runs the model once on a set of probes, records what each language layer from
`first_layer` on receives (the hidden states entering that layer, and every layer's own attention
mask, rotary embeddings and position ids exactly as the model passed them), and from then on
computes the loss by running only those layers and the final modules (`VLM.final_modules`: final
norm, lm_head).

Replaying recorded layer inputs, rather than re-entering the language model with `inputs_embeds`,
is exact for every family without knowing how each builds its positions: OPT adds learned positions
to the embeddings, Qwen2-VL computes 3-D mrope positions in the outer model from the image grids,
Qwen2 gives sliding-window layers their own mask. The same modules run on the same tensors, so
losses, gradients and edited weights are the full forward's bit for bit on a deterministic device.
The capture runs without a key/value cache (a forward with one computes the same attention: the
cache only hands the keys and values through), so the replayed layers get none either; their
arguments are then the same objects at every step, and a frozen part of a replayed layer (the
attention and norms of the last layer when only its MLP trains) can hand back its output
(`backbones/frozen_vision.reuse_frozen_outputs`, which `FineTune` applies).
The first replayed loss is also compared with the full forward's, bit for bit: an adapter that
misses something (an op between layers, logit soft-capping) fails that check, warns, and the loss
falls back to `vlm.loss` for the rest of its life.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

from backbones.batching import BatchingBackbone, answer_nll
from core.case import Probe


def first_trained_layer(vlm: BatchingBackbone, params: Iterable[nn.Parameter]) -> int | None:
    """The lowest language layer that uses any of `params`; N (the layer count) for the final modules only.

    None when the frozen prefix cannot be cached: the adapter names no final modules, or one of the
    parameters is also used below the language layers (vision tower, projector, embeddings, or an
    lm_head tied to the input embeddings, whose training would change the prefix itself).
    """
    final = vlm.final_modules()
    if final is None:
        return None
    layers = list(vlm.language_layers())
    n = len(layers)
    roots = [(j, layer) for j, layer in enumerate(layers)] + [(n, m) for m in final]
    lowest: dict[int, int] = {}
    upper_modules: set[int] = set()
    for j, root in roots:
        for module in root.modules():
            upper_modules.add(id(module))
        for p in root.parameters():
            lowest[id(p)] = min(lowest.get(id(p), j), j)
    # A tensor is shared by identity (tied weights), so any module outside the replayed part that
    # holds it directly means it also shapes the prefix.
    below = {
        id(p)
        for module in vlm.model.modules()
        if id(module) not in upper_modules
        for p in module.parameters(recurse=False)
    }
    found = []
    for p in params:
        if id(p) in below or id(p) not in lowest:
            return None
        found.append(lowest[id(p)])
    return min(found) if found else None


class PrefixCachedLoss:
    """`vlm.loss(probes)` that runs the frozen part below `first_layer` once and replays the rest.

    Call it once per optimisation step. Only valid while nothing below `first_layer` changes (what
    `first_trained_layer` establishes for the trained parameters); build a new one per set of probes.
    `cached` says whether the replay is in use (False after a failed first-call check).

    Args:
        vlm: the backbone.
        probes: the probes whose mean answer NLL is the loss.
        first_layer: index of the first language layer to replay (0..N; N replays only the final
            modules), as returned by `first_trained_layer`.
    """

    def __init__(self, vlm: BatchingBackbone, probes: Sequence[Probe], first_layer: int) -> None:
        layers = vlm.language_layers()
        final = vlm.final_modules()
        if final is None:
            raise ValueError(f"{type(vlm).__name__} names no final modules; it cannot replay layers")
        if not 0 <= first_layer <= len(layers):
            raise ValueError(f"first_layer must be in 0..{len(layers)}, got {first_layer}")
        self.vlm = vlm
        self.probes = list(probes)
        self.layers = list(layers)[first_layer:]
        self.final = final
        self.first_layer = first_layer
        self._checked = False
        self._capture()

    @property
    def cached(self) -> bool:
        return self._calls is not None

    def _capture(self) -> None:
        """One full forward without gradients: records each replayed layer's inputs and the loss."""
        # With no layer to replay, the entry is the first final module (it takes a plain tensor).
        entries: list[nn.Module] = self.layers if self.layers else self.final[:1]
        recorded: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in entries]

        def recorder(slot: list) -> Callable[..., None]:
            def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                slot.append((args, dict(kwargs)))

            return record

        handles = [
            m.register_forward_pre_hook(recorder(r), with_kwargs=True)
            for m, r in zip(entries, recorded, strict=True)
        ]
        try:
            with torch.no_grad():
                batch = self.vlm.build_batch(self.probes)
                # No key/value cache: the layers then get none, nor does a replay, so a replayed
                # call's arguments are the same objects at every step and frozen parts of the
                # replayed layers can hand back their outputs (see `FineTune`).
                self._reference = answer_nll(self.vlm.logits(batch, use_cache=False), batch.labels)
        finally:
            for h in handles:
                h.remove()
        self._labels = batch.labels
        self._calls: list[tuple[tuple[Any, ...], dict[str, Any], bool]] | None = None
        self._fresh_cache = False
        if any(len(r) != 1 for r in recorded):
            # A layer skipped or run twice (layer drop, a second pass): the recording is no replay.
            return
        calls = [_split_hidden(*r[0]) for r in recorded]
        if any(c is None for c in calls):
            return  # the hidden states came under a name this replay does not know
        # Only the first entry's hidden states are kept: each later layer gets its predecessor's
        # output. A clone, in case the model changed the recorded tensor in place after the hook.
        self._hidden = calls[0][0].clone()
        self._calls = [(_cache_slots(a), _cache_slots(k), by_name) for _, a, k, by_name in calls]
        if not self.layers:
            self._calls = []  # the final modules take the hidden states alone
        self._fresh_cache = any(v is _FRESH_CACHE for a, k, _ in self._calls for v in (*a, *k.values()))

    def _replay(self) -> torch.Tensor:
        assert self._calls is not None
        # A fresh, empty cache per replay, as the full forward makes one per call: the layers then
        # run exactly the ops they ran there (keys and values copied through the cache included).
        cache = DynamicCache(config=self.vlm.model.config) if self._fresh_cache else None
        hidden = self._hidden
        for layer, (slots_args, slots_kwargs, by_name) in zip(self.layers, self._calls, strict=True):
            args = tuple(cache if v is _FRESH_CACHE else v for v in slots_args)
            kwargs = {k: cache if v is _FRESH_CACHE else v for k, v in slots_kwargs.items()}
            out = layer(*args, hidden_states=hidden, **kwargs) if by_name else layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        for module in self.final:
            hidden = module(hidden)
        return answer_nll(hidden, self._labels)

    def __call__(self) -> torch.Tensor:
        if self._calls is None:
            return self.vlm.loss(self.probes)
        if self._checked:
            return self._replay()
        self._checked = True
        try:
            loss = self._replay()
            problem = None if torch.equal(loss.detach(), self._reference) else "a different loss"
        except Exception as err:  # a layer that cannot be called again this way: run the whole model
            problem = f"{type(err).__name__}: {err}"
        if problem is None:
            return loss
        warnings.warn(
            f"{type(self.vlm).__name__}: replaying the language layers from {self.first_layer} does not "
            f"reproduce the full forward ({problem}); running the whole model for these probes",
            stacklevel=2,
        )
        self._calls = None
        return self.vlm.loss(self.probes)


# Stands for "a new empty DynamicCache" in a recorded call.
_FRESH_CACHE = object()


def _split_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any], bool] | None:
    """(hidden states, other args, other kwargs, whether the hidden states came by name) of one
    call; None where they came neither first nor as `hidden_states`."""
    if args:
        return args[0], args[1:], kwargs, False
    if "hidden_states" not in kwargs:
        return None
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs, True


def _cache_slots(value: Any) -> Any:
    """The recorded args or kwargs with the capture pass's key/value cache taken out.

    A replay must neither append to that cache (it holds this pass's keys and values) nor keep it
    alive. A DynamicCache (what the families make for a plain forward) becomes a slot for a fresh
    one per replay; any other cache becomes None and `use_cache` False, which the first-call check
    then vets.
    """
    if isinstance(value, dict):
        out = {k: _cache_slot(v) for k, v in value.items()}
        if "use_cache" in out and any(
            isinstance(v, Cache) and type(v) is not DynamicCache for v in value.values()
        ):
            out["use_cache"] = False
        return out
    return tuple(_cache_slot(v) for v in value)


def _cache_slot(value: Any) -> Any:
    if type(value) is DynamicCache:
        return _FRESH_CACHE
    return None if isinstance(value, Cache) else value
