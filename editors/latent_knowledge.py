"""UniKE's external half: in-context knowledge as a key-value memory read inside self-attention.

UniKE (section 3.1, Eq. 2; Appendix A, Eqs. 8-9) observes that prepending in-context knowledge
X_know to an input only changes each input token's attention output by a position-wise shift:

    Attn(X_input, [X_know, X_input]) = alpha * h_input + (1 - alpha) * h_know,
    h_input = Attn(X_input, X_input, X_input),    h_know = Attn(X_input, X_know, X_know),

with alpha the share of attention the token keeps on the input. So instead of lengthening the prompt,
the hidden states of in-context knowledge are stored as an external memory M_ext = {(h_sem, h_pos)}
(section 3.2, "Accommodation: External Knowledge Resorting") and, in each hooked layer, every
position's pre-attention state h_pre retrieves the top-K entries whose keys h_sem are most similar
(cosine) to it; their values h_pos serve as both keys and values of the layer's own attention with
h_pre as the query (W_q, W_k, W_v, W_o of that layer), giving h_know, and the module's output is
mixed as above. D.3: top-40 entries, the last four layers, memories of more than 15K triplets.

Which way alpha points. Eq. 2 (and the derivation, Eq. 9) makes alpha the weight of the *input*;
section 3.3 and Eq. 7 then set alpha = Sim(Enc_Sem(h_know), h_input[-1]) while the text says that
"when the relevance between the in-context knowledge and the input sample is weak, alpha ... takes a
small value ... a smaller alpha effectively reduces its inclusion magnitude", and Fig. 4b reads alpha
as the knowledge's weight too. Taken literally, Eq. 7 would give *irrelevant* knowledge the larger
weight. We keep Eq. 2's convention for `alpha` (the input's weight, so `alpha=1.0` is the unedited
model) and follow the text in adaptive mode: the knowledge weight is the relevance
s = max(0, cos(Enc_Sem(h_know_state), h_pre)) and alpha = 1 - s, per position.

h_know_state. Enc_Sem was trained on hidden states (h_pos, h_neg) in the residual stream, not on
attention outputs in W_o's output space, so it is given the in-context knowledge in that state
space: sum_k w_k V_k, the retrieved values mixed by the attention weights averaged over heads. It is
compared with the position's own pre-attention state (the paper uses the last input token's state,
h_input[-1], which "serves a similar role as h_sem"; per position keeps the mixing causal).

Per position and causal: retrieval and mixing depend on a position's own h_pre only, which depends
on the tokens up to it, so a teacher-forced pass, a prefix-cached suffix pass and greedy decoding
compute the same shift at the same position (greedy answers can be read off the teacher-forced pass,
`backbones/greedy_from_tf.py`).

Image positions. `positions="text"` shifts only positions that do not hold image features. The
hooks see hidden states, not tokens, so the token ids are read where every family embeds them (a
pre-hook on the input embedding: the top-level forward, BLIP-2's generate, each decoding step); the
image placeholders are in those ids for every family (`VLM.build_batch` writes one per image token).
A pass that enters the layers without embedding ids (a replay of recorded layer inputs,
`backbones/frozen_prefix.py`) uses the ids of the latest embedding call, which are the recording
pass's when nothing ran in between; ids of another shape are refused with an error.

Cost. Retrieval is one matmul of the positions' states with the layer's normalised keys and a top-k,
in chunks of positions (small ones on a CPU, where the gathered entries then stay in cache; large
ones on a GPU). The attention over the K retrieved values V is computed with W_k and W_v folded onto
the query side, which gathers V once instead of gathering projected keys and values:

    score_k = q_h . (W_k,h V_k + b_k,h) = (W_k,h^T q_h) . V_k + const   (the constant cancels in softmax)
    sum_k w_k (W_v,h V_k + b_v,h) = W_v,h (sum_k w_k V_k) + b_v,h      (the weights sum to one)

Nothing is precomputed from the weights, so edits of W_k / W_v (and gradients into them) just work,
and sum_k w_k V_k per head is the adaptive mode's h_know_state for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from backbones.base import VLM
from backbones.layer_parts import AttentionParts

#: The input's weight in Eq. 2 (1.0: the unedited model), or "adaptive": 1 - relevance per position.
AlphaMode = float | Literal["adaptive"]
Positions = Literal["all", "text"]
#: Enc_Sem(layer, states) -> states in h_sem's space (the layer as spelled in `layers`; float32 states).
SemanticEncoder = Callable[[int, Tensor], Tensor]


@dataclass
class KnowledgeRead:
    """What one layer's memory gives a set of positions (rows of pre-attention states).

    h_know: (R, H) the layer's attention over the retrieved entries (Eq. 2's h_know, after W_o).
    weights: (R, heads, K) the attention weights over the retrieved entries.
    indices: (R, K) the retrieved entries (rows of the layer's memory), most similar first.
    state: (R, H) sum_k w_k V_k with head-averaged weights (the knowledge in the state space).
    """

    h_know: Tensor
    weights: Tensor
    indices: Tensor
    state: Tensor


class Handle:
    """The hooks of one `LatentKnowledge.attach()`; `remove()` takes them all off (idempotent)."""

    def __init__(self, owner: LatentKnowledge, hooks: list[RemovableHandle]) -> None:
        self._owner = owner
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._hooks:
            self._owner._attached = False
            self._owner._ids = None
        self._hooks = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class _Prepared:
    """A layer's entries on one device and dtype, ready to read."""

    keys: Tensor  # (N, H) unit-norm keys
    values: Tensor  # (N, H)


class _LayerMemory:
    """One layer's entries as segments (the initial memory is token 0, each `add` one more)."""

    def __init__(self, parts: AttentionParts) -> None:
        self.parts = parts
        self.segments: dict[int, tuple[Tensor, Tensor]] = {}
        self._place: tuple[torch.device, torch.dtype] | None = None
        self._cache: dict[int, _Prepared] = {}
        self._merged: _Prepared | None = None
        self._merged_tokens: tuple[int, ...] = ()

    def size(self) -> int:
        return sum(k.shape[0] for k, _ in self.segments.values())

    def prepared(self, device: torch.device, dtype: torch.dtype) -> _Prepared:
        """All entries on `device` in `dtype`; each segment is moved and normalised once, not per call."""
        if self._place != (device, dtype):
            self._cache.clear()
            self._merged = None
            self._place = (device, dtype)
        tokens = tuple(self.segments)
        if self._merged is not None and self._merged_tokens == tokens:
            return self._merged
        for token in [t for t in self._cache if t not in self.segments]:
            del self._cache[token]
        # Built outside inference mode: a memory first read by a scoring pass (inference mode) must
        # still serve a later pass that trains through the hooks (inference tensors cannot be saved).
        with torch.inference_mode(False), torch.no_grad():
            for token, (keys, values) in self.segments.items():
                if token not in self._cache:
                    # Normalised in float32: a bf16 key's norm is summed over the whole width.
                    unit = F.normalize(keys.to(device, torch.float32), dim=-1).to(dtype)
                    self._cache[token] = _Prepared(unit, values.to(device, dtype))
            parts = [self._cache[t] for t in tokens]
            # One segment (the usual case between edits) is used as it is, without a copy.
            merged = (
                parts[0]
                if len(parts) == 1
                else _Prepared(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))
            )
        self._merged, self._merged_tokens = merged, tokens
        return merged


class LatentKnowledge:
    """A memory of (key = h_sem, value = h_pos) pre-attention states per layer, read by hooks on the layers' self-attention.

    Args:
        vlm: the backbone whose language layers are hooked.
        layers: language layers to shift (negative indices count from the end; D.3: the last four).
        keys: per layer (as spelled in `layers`, or its non-negative index), (N, H) semantic states h_sem.
        values: per layer, (N, H) positive states h_pos, row i belonging to key i.
        top_k: entries retrieved per position (D.3: 40); a smaller memory gives all its entries.
        alpha: the input's weight in Eq. 2 (1.0 leaves the model bit-identical), or "adaptive":
            alpha = 1 - max(0, cos(semantic(layer, h_know_state), h_pre)) per position (see the
            module docstring for why the knowledge weight, not alpha, is the relevance).
        semantic: Enc_Sem(layer, states) -> states in h_sem's space; needed for adaptive alpha. It is
            called with the layer as spelled in `layers` and (R, H) float32 states on the model's device.
        positions: "all" shifts every position; "text" leaves image-token positions as they are
            (read off the token ids the model's input embedding is called with).
        record_alpha: keep the alphas of the last forward per layer in `last_alpha`.
    """

    #: Elements per chunk of positions, by device type: a chunk holds (rows x entries) similarities,
    #: then (rows x top_k x width) gathered values and (rows x heads x width) folded queries. On a
    #: CPU, chunks of ~4 MB keep the gathered values in cache (on the world backbone, 2,880 positions
    #: read 1,000 entries in 42 ms per layer in chunks of 64-256 rows, 52 ms as one); on a GPU,
    #: large ones keep kernel launches few.
    chunk_elements: dict[str, int] = {"cpu": 1 << 20, "cuda": 1 << 27}

    def __init__(
        self,
        vlm: VLM,
        layers: Sequence[int],
        keys: Mapping[int, Tensor],
        values: Mapping[int, Tensor],
        top_k: int = 40,
        alpha: AlphaMode = 0.5,
        semantic: SemanticEncoder | None = None,
        positions: Positions = "all",
        *,
        record_alpha: bool = False,
    ) -> None:
        if not layers:
            raise ValueError("LatentKnowledge: give at least one layer to hook")
        if top_k < 1:
            raise ValueError(f"LatentKnowledge: top_k must be >= 1, got {top_k}")
        if alpha != "adaptive":
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
                raise ValueError(
                    f"LatentKnowledge: alpha must be a number in [0, 1] or 'adaptive', got {alpha!r}"
                )
            alpha = float(alpha)
        elif semantic is None:
            raise ValueError("LatentKnowledge: adaptive alpha needs a semantic encoder (semantic=...)")
        if positions not in ("all", "text"):
            raise ValueError(f"LatentKnowledge: positions must be 'all' or 'text', got {positions!r}")
        n = vlm.num_language_layers
        resolved: dict[int, int] = {}
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(
                    f"LatentKnowledge: layer {layer} out of range; the language model has {n} layers"
                )
            if layer % n in resolved.values():
                raise ValueError(f"LatentKnowledge: layer {layer} is given twice")
            resolved[layer] = layer % n
        self.vlm = vlm
        self.layers = list(layers)
        self.top_k = top_k
        self.alpha: AlphaMode = alpha
        self.semantic = semantic
        self.positions: Positions = positions
        self.record_alpha = record_alpha
        self.last_alpha: dict[int, Tensor] | None = None
        self._index = resolved
        self._memory = {layer: _LayerMemory(vlm.attention_parts(index)) for layer, index in resolved.items()}
        self._next_token = 1
        self._tokens: set[int] = set()  # tokens `add` gave out and `remove` has not taken back
        self._attached = False
        self._ids: Tensor | None = None  # token ids of the latest embedding call ("text" positions)
        self._image_token_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
        for layer, (k, v) in self._entries(keys, values, require_all=True).items():
            self._memory[layer].segments[0] = (k, v)

    # ----------------------------------------------------------------- memory
    def _layer(self, layer: int) -> int:
        """`layer` as spelled in `layers` (public methods take either spelling)."""
        if layer in self._memory:
            return layer
        for spelled, index in self._index.items():
            if index == layer % self.vlm.num_language_layers:
                return spelled
        raise KeyError(f"LatentKnowledge: layer {layer} is not hooked ({self.layers})")

    def _lookup(self, mapping: Mapping[int, Tensor], layer: int, what: str) -> Tensor | None:
        """`mapping`'s tensor for `layer` under either spelling (-1 or its non-negative index)."""
        spellings = {layer, self._index[layer]}
        found = [mapping[s] for s in spellings if s in mapping]
        if len(found) > 1:
            raise ValueError(f"LatentKnowledge: {what} give layer {layer} twice ({sorted(spellings)})")
        return found[0] if found else None

    def _entries(
        self, keys: Mapping[int, Tensor], values: Mapping[int, Tensor], require_all: bool
    ) -> dict[int, tuple[Tensor, Tensor]]:
        known = set(self._index) | set(self._index.values())
        unknown = sorted(set(keys) - known) + sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"LatentKnowledge: keys/values for layers {unknown}, which are not hooked ({self.layers})"
            )
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in self.layers:
            k, v = self._lookup(keys, layer, "keys"), self._lookup(values, layer, "values")
            if k is None and v is None and not require_all:
                continue
            if k is None or v is None:
                raise ValueError(f"LatentKnowledge: layer {layer} needs both keys and values")
            width = self._memory[layer].parts.q_proj.in_features
            if k.dim() != 2 or v.dim() != 2 or k.shape[0] != v.shape[0]:
                raise ValueError(
                    f"LatentKnowledge: layer {layer}: keys and values must be (N, H) with the same N, "
                    f"got {tuple(k.shape)} and {tuple(v.shape)}"
                )
            if k.shape[1] != width or v.shape[1] != width:
                raise ValueError(
                    f"LatentKnowledge: layer {layer}: entries must be {width} wide (the layer's width), "
                    f"got keys {k.shape[1]} and values {v.shape[1]}"
                )
            out[layer] = (k.detach(), v.detach())
        return out

    def add(self, keys: Mapping[int, Tensor], values: Mapping[int, Tensor]) -> int:
        """Append entries (an edit's own states) to the layers given; returns a token for `remove`."""
        entries = self._entries(keys, values, require_all=False)
        token = self._next_token
        self._next_token += 1
        self._tokens.add(token)
        for layer, kv in entries.items():
            self._memory[layer].segments[token] = kv
        return token

    def remove(self, token: int) -> None:
        """Drop the entries one `add` appended; the memory reads exactly as before that call."""
        if token not in self._tokens:
            raise KeyError(f"LatentKnowledge: no entries are held under token {token}")
        self._tokens.discard(token)
        for memory in self._memory.values():
            memory.segments.pop(token, None)

    def size(self, layer: int) -> int:
        """How many entries layer `layer`'s memory holds now."""
        return self._memory[self._layer(layer)].size()

    def describe(self) -> dict[str, object]:
        """What a results file records about the memory."""
        return {
            "layers": self.layers,
            "top_k": self.top_k,
            "alpha": self.alpha,
            "positions": self.positions,
            "entries": {layer: self.size(layer) for layer in self.layers},
        }

    # ----------------------------------------------------------------- reading
    def _fixed_input_weight(self) -> bool:
        return self.alpha != "adaptive" and float(self.alpha) == 1.0

    def _chunks(self, layer: int, states: Tensor) -> tuple[_Prepared, int, int]:
        """The layer's entries on `states`' device, how many to retrieve, and positions per chunk."""
        layer = self._layer(layer)
        memory = self._memory[layer]
        n = memory.size()
        if n == 0:
            raise ValueError(f"LatentKnowledge: layer {layer}'s memory is empty")
        k_top = min(self.top_k, n)
        heads = memory.parts.num_heads
        per_row = max(n, (k_top + 2 * heads) * states.shape[-1])
        budget = self.chunk_elements.get(states.device.type, self.chunk_elements.get("cuda", 1 << 27))
        return memory.prepared(states.device, states.dtype), k_top, max(1, budget // per_row)

    @staticmethod
    def _top(mem: _Prepared, pre: Tensor, k_top: int) -> Tensor:
        # Cosine ranking: a query's own norm scales its whole row of scores, so only the keys need
        # normalising (once, in `prepared`): one matmul and one top-k per chunk of positions.
        return (pre @ mem.keys.T).topk(k_top, dim=-1).indices

    def retrieve(self, layer: int, states: Tensor) -> Tensor:
        """(R, K) indices of the entries whose keys are most cosine-similar to each row of `states` (R, H)."""
        mem, k_top, rows = self._chunks(layer, states)
        return torch.cat(
            [self._top(mem, states[i : i + rows], k_top) for i in range(0, states.shape[0], rows)]
        )

    def read(self, layer: int, states: Tensor) -> KnowledgeRead:
        """Eq. 2's h_know (and what led to it) for rows of pre-attention states `states` (R, H) of `layer`.

        Per position: q = q_proj(h_pre); the K retrieved values V as keys k_proj(V) and values
        v_proj(V), split into heads (a query head uses its group's key/value head under grouped-query
        attention); softmax(q . k / sqrt(head_dim)) over the K entries; o_proj of the heads' mix.
        """
        parts = self._memory[self._layer(layer)].parts
        mem, k_top, rows = self._chunks(layer, states)
        width = states.shape[-1]
        heads, kv_heads, head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        group = heads // kv_heads
        scale = 1.0 / math.sqrt(head_dim)
        # W_k and W_v per key/value head, (kv_heads, head_dim, H): views, no copies.
        w_k = parts.k_proj.weight.view(kv_heads, head_dim, width)
        w_v = parts.v_proj.weight.view(kv_heads, head_dim, width)
        b_v = None if parts.v_proj.bias is None else parts.v_proj.bias.view(kv_heads, 1, head_dim)
        reads: list[KnowledgeRead] = []
        for start in range(0, states.shape[0], rows):
            pre = states[start : start + rows]
            r = pre.shape[0]
            indices = self._top(mem, pre, k_top)
            retrieved = mem.values.index_select(0, indices.reshape(-1)).view(r, k_top, width)
            # Memory entries have no position in the input, so no rotary / positional encoding is
            # applied to them, nor to the query (the dot product stays position-free). The scale is
            # ours: some modules (OPT) fold theirs into the query inside the forward.
            q = parts.q_proj(pre).view(r, kv_heads, group, head_dim)
            # Query head j*group + i uses key/value head j (as repeat_kv does): batch over kv heads.
            q = q.permute(1, 0, 2, 3).reshape(kv_heads, r * group, head_dim)
            folded = torch.bmm(q, w_k).view(kv_heads, r, group, width).permute(1, 0, 2, 3)
            folded = folded.reshape(r, heads, width)  # W_k,h^T q_h; k_proj's bias cancels in softmax
            scores = torch.bmm(folded, retrieved.transpose(1, 2)) * scale  # (r, heads, K)
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            mixed = torch.bmm(weights, retrieved)  # (r, heads, H): sum_k w_k V_k per head
            per_kv = (
                mixed.view(r, kv_heads, group, width).permute(1, 0, 2, 3).reshape(kv_heads, r * group, width)
            )
            context = torch.bmm(per_kv, w_v.transpose(1, 2))  # (kv_heads, r * group, head_dim)
            if b_v is not None:
                context = context + b_v  # v_proj's bias passes through: the weights sum to one
            context = (
                context.view(kv_heads, r, group, head_dim).permute(1, 0, 2, 3).reshape(r, heads * head_dim)
            )
            reads.append(KnowledgeRead(parts.o_proj(context), weights, indices, mixed.mean(dim=1)))
        if len(reads) == 1:
            return reads[0]
        return KnowledgeRead(
            torch.cat([x.h_know for x in reads]),
            torch.cat([x.weights for x in reads]),
            torch.cat([x.indices for x in reads]),
            torch.cat([x.state for x in reads]),
        )

    def shift(self, layer: int, h_pre: Tensor, h_input: Tensor, mask: Tensor | None = None) -> Tensor:
        """The mixed attention output alpha * h_input + (1 - alpha) * h_know of `layer` (Eq. 2).

        h_pre, h_input: (B, T, H) the module's input and attention output. `mask`: (B, T) bool, the
        positions to shift (None: all); the others keep h_input. Returns `h_input` itself when
        nothing is shifted.
        """
        layer = self._layer(layer)
        batch, length, width = h_input.shape
        if self._fixed_input_weight() or self._memory[layer].size() == 0:
            self._record(layer, None, None, (batch, length), h_input.device)
            return h_input
        pre = h_pre.reshape(-1, width)
        out = h_input.reshape(-1, width)
        where = None
        if mask is not None:
            where = mask.reshape(-1).nonzero().squeeze(1)
            if where.numel() == 0:
                self._record(layer, None, None, (batch, length), h_input.device)
                return h_input
            pre, out = pre.index_select(0, where), out.index_select(0, where)
        read = self.read(layer, pre)
        if self.alpha == "adaptive":
            # float32 in: the knowledge states (and so Enc_Sem's training) are float32, whatever the
            # backbone's dtype, and the similarity of bf16 vectors is too coarse to weigh with.
            encoded = self.semantic(layer, read.state.float())  # type: ignore[misc]
            relevance = F.cosine_similarity(encoded.float(), pre.float(), dim=-1).clamp(0.0, 1.0)
            alpha: Tensor | float = (1.0 - relevance).to(out.dtype).unsqueeze(-1)
        else:
            alpha = float(self.alpha)
        mixed = alpha * out + (1.0 - alpha) * read.h_know
        self._record(layer, alpha, where, (batch, length), h_input.device)
        if where is None:
            return mixed.view(batch, length, width)
        return h_input.reshape(-1, width).index_copy(0, where, mixed).view(batch, length, width)

    def _record(
        self,
        layer: int,
        alpha: Tensor | float | None,
        where: Tensor | None,
        shape: tuple[int, int],
        device: torch.device,
    ) -> None:
        """Keep the alphas a forward used at layer `layer` (1 where nothing was shifted), when asked."""
        if not self.record_alpha:
            return
        full = torch.ones(shape[0] * shape[1], device=device)
        if alpha is not None:
            count = full.numel() if where is None else where.numel()
            if isinstance(alpha, Tensor):
                values = alpha.detach().float().reshape(-1)
            else:
                values = torch.full((count,), alpha, device=device)
            full = values if where is None else full.index_copy(0, where, values)
        if self.last_alpha is None:
            self.last_alpha = {}
        self.last_alpha[layer] = full.view(shape)

    # ----------------------------------------------------------------- hooks
    def _text_positions(self, h_pre: Tensor) -> Tensor:
        ids = self._ids
        if ids is None or tuple(ids.shape) != tuple(h_pre.shape[:2]):
            raise RuntimeError(
                "LatentKnowledge(positions='text'): the token ids of this pass are not known (the input "
                f"embedding last saw {None if ids is None else tuple(ids.shape)}, the layer gets "
                f"{tuple(h_pre.shape[:2])}); pass input_ids to the model or use positions='all'"
            )
        return ids.to(h_pre.device) != self._image_token_id

    def attach(self) -> Handle:
        """Register the hooks on every memory layer's self-attention; `Handle.remove()` takes them off."""
        if self._attached:
            raise RuntimeError("LatentKnowledge is already attached; remove its handle first")
        hooks: list[RemovableHandle] = []
        if self.positions == "text":
            # Every family embeds its token ids (image placeholders included) before the decoder
            # runs: in the top-level forward, in BLIP-2's generate, and at each decoding step. The
            # ids of that call say which positions of the pass hold image features.
            def remember_ids(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                ids = args[0] if args else kwargs.get("input")
                if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
                    self._ids = ids

            embedding = self.vlm.model.get_input_embeddings()
            hooks.append(embedding.register_forward_pre_hook(remember_ids, with_kwargs=True))
        for layer in self.layers:
            hooks.append(
                self._memory[layer].parts.module.register_forward_hook(self._hook(layer), with_kwargs=True)
            )
        self._attached = True
        return Handle(self, hooks)

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple, dict, object], object]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            if self._fixed_input_weight():
                self._record_untouched(layer, output)
                return None  # alpha = 1: the module's own output, not even re-added
            h_pre = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h_input = output[0] if isinstance(output, tuple) else output
            mask = self._text_positions(h_pre) if self.positions == "text" else None
            mixed = self.shift(layer, h_pre, h_input, mask)
            if mixed is h_input:
                return None
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def _record_untouched(self, layer: int, output: object) -> None:
        if self.record_alpha:
            h = output[0] if isinstance(output, tuple) else output
            self._record(layer, None, None, (h.shape[0], h.shape[1]), h.device)
