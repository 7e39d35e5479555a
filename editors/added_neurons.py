"""Key-value neurons added to a layer's feed-forward block, without touching a backbone weight.

An FFN is a key-value memory (Geva et al.; UniKE section 3.1): its input q is matched against keys,
and the activations weight the values that are summed into the output. T-Patcher ("one mistake
worth one neuron") and UniKE's intrinsic half write an edit by adding a few such pairs:

    FFN'(q) = FFN(q) + act(q @ keys + key_bias) @ (values + value_shift)

`NeuronPatch` holds n added pairs for one layer; `attach_patches` puts any number of them on a
backbone's layers through forward hooks on `VLM.ffn_ports(layer)` (a forward-pre hook on the input
module reads q, a forward hook on the output module adds the increment; on OPT those are fc1 and
fc2, on Llama-style layers both are the `mlp`). Hooks rather than wider weight matrices, so that
the backbone's tensors never change: removing the hooks gives back the original model bit for bit,
and restoring an edit costs nothing.

The added neurons are a plain key-value memory with their own activation (ReLU by default, as
T-Patcher's patch), whatever the backbone's FFN uses (SwiGLU, ReLU, GELU): they are not a widening
of the gated FFN, so their activation is a setting of the patch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backbones.base import VLM
from backbones.batching import ProbeBatch
from backbones.frozen_prefix import PrefixCachedLoss
from backbones.frozen_vision import reuse_frozen_outputs
from core.case import Probe

#: The activations a patch may use (name -> function applied to the key scores).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


class NeuronPatch(nn.Module):
    """n key-value neurons added to one layer's FFN: out += act(q @ keys + key_bias) @ (values + value_shift).

    Every parameter starts at zero, so a new patch adds exactly nothing (act(0) = 0 for each
    activation offered) until its caller initialises it. The patch computes in its own dtype (keep
    it float32 for training on a bf16 backbone); the increment is cast to the FFN output's dtype.

    Args:
        hidden_size: the width of the FFN's input and output (the residual width).
        n_neurons: how many key-value pairs (0 is allowed: a patch that adds nothing).
        activation: "relu" (T-Patcher's), "gelu" or "silu".
        device, dtype: where and in which precision the parameters live.
    """

    keys: nn.Parameter  # [hidden, n]
    key_bias: nn.Parameter  # [n]
    values: nn.Parameter  # [n, hidden]

    def __init__(
        self,
        hidden_size: int,
        n_neurons: int,
        activation: str = "relu",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"NeuronPatch: hidden_size must be >= 1, got {hidden_size}")
        if n_neurons < 0:
            raise ValueError(f"NeuronPatch: n_neurons must be >= 0, got {n_neurons}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"NeuronPatch: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.n_neurons = n_neurons
        self.activation = activation
        self.keys = nn.Parameter(torch.zeros(hidden_size, n_neurons, **kwargs))
        self.key_bias = nn.Parameter(torch.zeros(n_neurons, **kwargs))
        self.values = nn.Parameter(torch.zeros(n_neurons, hidden_size, **kwargs))
        #: Added to every value row (UniKE's beta * zeta'); a plain tensor the caller sets, so it
        #: may be the output of another network and carry its gradient. None: no shift.
        self.value_shift: Tensor | None = None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, n_neurons={self.n_neurons}, activation={self.activation!r}"

    def scores(self, q: Tensor) -> Tensor:
        """The pre-activations q @ keys + key_bias, [..., n], in the patch's dtype.

        T-Patcher's margins are put on these (a ReLU neuron's activation is 0 for every negative
        score, so the activation alone would not say how far below its threshold an input stays).
        """
        return q.to(self.keys.dtype) @ self.keys + self.key_bias

    def nonlinearity(self, scores: Tensor) -> Tensor:
        """The activation function applied to `scores`."""
        return ACTIVATIONS[self.activation](scores)

    def activations(self, q: Tensor) -> Tensor:
        """act(q @ keys + key_bias), [..., n]: the weight each added value gets for the query q."""
        return self.nonlinearity(self.scores(q))

    def increment(self, scores: Tensor) -> Tensor:
        """The FFN output's increment for already computed `scores`, [..., hidden], in the patch's dtype."""
        values = (
            self.values if self.value_shift is None else self.values + self.value_shift.to(self.values.dtype)
        )
        return self.nonlinearity(scores) @ values

    def forward(self, q: Tensor) -> Tensor:
        """The FFN output's increment for the query q, [..., hidden] (in the patch's dtype)."""
        return self.increment(self.scores(q))


class PatchHandle:
    """The hooks that put `NeuronPatch`es on a backbone's FFNs; `remove()` takes them all off.

    `add(layer, patch)` attaches one more patch (sequential editing keeps adding; earlier ones stay).
    `recording()` is a context manager whose dict holds, for each patched layer, the scores
    (pre-activations, `NeuronPatch.scores`) of each of its patches on the last forward through that
    layer, aligned with `patches[layer]`, with their autograd history (a layer whose patches all
    have zero neurons is skipped and records nothing). The scores have the
    FFN input's leading shape: [batch, seq, n] on Llama-style layers, [batch * seq, n] on OPT,
    which flattens the rows before its FFN. Outside a recording nothing is kept.
    """

    def __init__(self, vlm: VLM) -> None:
        self.vlm = vlm
        self.n_layers = vlm.num_language_layers
        #: Patches by (non-negative) layer index, in the order they were added.
        self.patches: dict[int, list[NeuronPatch]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # The FFN input of each hooked layer between its input and output module calls.
        self._queries: dict[int, Tensor] = {}
        self._recorded: dict[int, list[Tensor]] | None = None
        self._paused = False
        self.removed = False

    def layer_index(self, layer: int) -> int:
        """`layer` as a non-negative index (negative counts from the last language layer)."""
        if not -self.n_layers <= layer < self.n_layers:
            raise ValueError(f"layer {layer}: the language model has {self.n_layers} layers")
        return layer % self.n_layers

    def add(self, layer: int, patch: NeuronPatch) -> None:
        """Attach `patch` to the FFN of language layer `layer` (hooks are registered on first use)."""
        if self.removed:
            raise RuntimeError("PatchHandle: add() after remove(); attach a new handle instead")
        index = self.layer_index(layer)
        if index not in self.patches:
            self._hook(index)
        self.patches[index].append(patch)

    def all_patches(self) -> list[NeuronPatch]:
        return [p for layer in sorted(self.patches) for p in self.patches[layer]]

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, list[Tensor]]]:
        """Inside the block, each forward leaves the patches' scores in the yielded dict (see above)."""
        recorded: dict[int, list[Tensor]] = {}
        previous, self._recorded = self._recorded, recorded
        try:
            yield recorded
        finally:
            self._recorded = previous

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block the patches add nothing: the backbone computes what it computed unpatched.

        For reading states of the model as it was before the sequence (UniKE's edit states in a
        lifelong sequence) without taking the patches off.
        """
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def remove(self) -> None:
        """Take every hook off: the backbone computes exactly what it computed before `attach_patches`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._queries.clear()
        self.removed = True

    def _hook(self, index: int) -> None:
        ports = self.vlm.ffn_ports(index)
        self.patches[index] = []

        def read_query(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.patches[index] or self._paused:
                return
            q = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if q is not None:
                self._queries[index] = q

        def add_increment(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            q = self._queries.pop(index, None)
            patches = self.patches[index]
            if q is None or not isinstance(output, Tensor) or not any(p.n_neurons for p in patches):
                # Nothing to add: returning None keeps the module's own output object, bit for bit.
                return None
            # Aligned with self.patches[index] (a zero-neuron patch gets an empty score tensor).
            scores = [p.scores(q) for p in patches]
            if self._recorded is not None:
                self._recorded[index] = scores
            total: Tensor | None = None
            for patch, s in zip(patches, scores, strict=True):
                if patch.n_neurons:
                    part = patch.increment(s).to(output.dtype)
                    total = part if total is None else total + part
            # A new tensor, never an in-place add: the module's output may be kept by others
            # (frozen-output reuse compares it by version) and autograd must see the sum.
            return output + total

        self._hooks.append(ports.input_module.register_forward_pre_hook(read_query, with_kwargs=True))
        self._hooks.append(ports.output_module.register_forward_hook(add_increment))


def attach_patches(vlm: VLM, patches: Mapping[int, Sequence[NeuronPatch]]) -> PatchHandle:
    """Hook `patches` (layer index -> patches, several per layer allowed) onto the backbone's FFNs.

    Layers with no patch get no hook. Returns the handle that adds more, records scores and
    removes every hook.
    """
    handle = PatchHandle(vlm)
    hidden = ffn_width(vlm)
    for layer, layer_patches in patches.items():
        for patch in layer_patches:
            if patch.hidden_size != hidden:
                raise ValueError(
                    f"attach_patches: a patch for layer {layer} has hidden_size {patch.hidden_size}, "
                    f"the backbone's FFN width is {hidden}"
                )
            handle.add(layer, patch)
    return handle


def ffn_width(vlm: VLM) -> int:
    """The width of the language model's FFN input and output (its `hidden_size`)."""
    width = getattr(vlm.text_config(), "hidden_size", None)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{type(vlm).__name__}: the text config names no hidden_size")
    return width


@contextlib.contextmanager
def capture_ffn_inputs(vlm: VLM, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the block, each forward leaves each given layer's FFN input q in the yielded dict.

    Keys are the layer indices as given. On OPT the queries come flattened ([batch * seq, hidden]),
    as the layer hands them to fc1.
    """
    captured: dict[int, Tensor] = {}
    hooks = []
    for layer in layers:

        def read(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer
        ) -> None:
            q = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if q is not None:
                captured[layer] = q

        hooks.append(vlm.ffn_ports(layer).input_module.register_forward_pre_hook(read, with_kwargs=True))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def patch_training_loss(
    vlm: VLM, probes: Sequence[Probe], batch: ProbeBatch, first_layer: int, stack: ExitStack
) -> tuple[Callable[[], Tensor], PrefixCachedLoss | None]:
    """The probes' answer NLL as a closure for training patches on layers from `first_layer` up.

    Building it runs the whole model once (with the patches attached at that moment). Per call only
    the layers from `first_layer` and the final modules run where that is exact
    (`backbones/frozen_prefix.PrefixCachedLoss`, which checks its first loss against the full
    forward); otherwise the whole model runs, with the vision tower and projector answering from
    their first output. Returns the closure and the replay (None without one); `stack` keeps the
    frozen-output reuse alive for as long as the closure is used.
    """
    if vlm.final_modules() is not None:
        cached = PrefixCachedLoss(vlm, probes, first_layer)
        if cached.cached:
            # The first replayed layer's frozen parts (attention, norms, the FFN itself; the
            # patch's hooks still run around it) get the same inputs at every step.
            stack.enter_context(reuse_frozen_outputs(list(cached.layers[0].children())))
            return cached, cached
    else:
        vlm.model(**batch.inputs, use_cache=False)  # the forward callers read FFN inputs from
    # The vision tower and projector still see the same pixels at every step.
    stack.enter_context(reuse_frozen_outputs(vlm.vision_modules() + vlm.projector_modules()))
    return (lambda: vlm.batch_loss(batch)), None
