"""UniKE (Pan et al., NeurIPS 2024): intrinsic and external knowledge editing, unified in latent space.

Section 3 of the paper, on the last four language layers (D.3):

- **Intrinsic knowledge (assimilation, Eq. 3)**: 10 key-value neurons added to the FFN of each layer
  and trained on the edit, T-Patcher style. This class *is* a `TPatcher` for that part: the same
  initialisation, edit loss and activation / memory margins, the same memory of unrelated inputs.
- **External knowledge (accommodation, Eq. 2)**: a memory of (h_sem, h_pos) pre-attention states of
  in-context knowledge, read inside each layer's self-attention (`editors/latent_knowledge.py`):
  per position the top-K keys by cosine, attention over their values with the layer's own
  projections, and the feature shift alpha * h_input + (1 - alpha) * h_know. The memory holds the
  mined triplets (`python -m knowledge.mine`, > 15K on the world) and, per edit, the edit's own
  states (its prompt's h_sem, and h_pos of prompt + new answer): the edit is the in-context fact.
- **Collaboration (section 3.3)**: the neurons are trained while the feature shift is live, so the
  FFN learns from the shifted states; the truthfulness direction zeta = mean Enc_Tru(h_pos) -
  mean Enc_Tru(h_neg), mapped back by W_zeta, guides the new values (W_V + beta * zeta', Eq. 6); and
  alpha adapts per position to the semantic relevance of the retrieved knowledge (Eq. 7). The
  encoders and W_zeta are trained by `python train.py fit --config configs/train/unike_encoders.yaml`.

Every number is a setting, and the paper's ablations are settings of this one class (Table 4,
Figure 4; `configs/edit/unike_ablations/`): `intrinsic: false` (only latent IKE), `external: none`
(only intrinsic), `external: vanilla` (intrinsic + IKE's context in the prompt), a fixed `alpha` with
`zeta: none` (intrinsic + latent IKE without collaboration), fixed alpha values, and `zeta` removed /
random / semantic.

`alpha` follows Eq. 2: the weight of the input's own attention output (1.0 leaves the model as it
was); in adaptive mode the knowledge gets the weight of its relevance (see latent_knowledge.py for
why this reading of Eq. 7). zeta' is a constant per layer here: W_zeta is learned with the encoders
(the paper calls it learnable without saying on what), so each edit trains only its neurons.

No backbone weight changes: the neurons and the shift are forward hooks, and the edit's memory
entries are removed again, so `restore()` gives back the original model bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from backbones.base import VLM
from core.case import EditCase, Probe
from editors.added_neurons import NeuronPatch, ffn_width
from editors.base import EditHandle
from editors.ike import IKE
from editors.latent_knowledge import Handle as LatentHandle
from editors.latent_knowledge import LatentKnowledge
from editors.tpatcher import PatchEditHandle, TPatcher, initialised_patch
from editors.unike_encoders import KnowledgeEncoders, load_encoders
from knowledge.states import KnowledgeStates, extract_states, load_knowledge_states

External = Literal["latent", "vanilla", "none"]
ZetaMode = Literal["truthful", "none", "random", "semantic"]


class UniKE(TPatcher):
    """UniKE: added FFN neurons (intrinsic) + latent in-context knowledge (external), collaborating.

    Args:
        knowledge: folder written by `python -m knowledge.mine` (the triplets and their states at
            `layers`, keyed by the backbone; another backbone is refused in one line). Needed for
            `external: latent` and for zeta.
        encoders: the contrastive encoders' checkpoint (`train.py fit` with
            configs/train/unike_encoders.yaml); needed for adaptive alpha and for zeta other than
            "none" / "random" without a scale.
        intrinsic: add and train neurons (False: only the external half).
        external: "latent" (the memory read inside attention), "vanilla" (IKE: the new fact and
            `ike_k` demonstrations from `memory_file` in the prompt) or "none".
        top_k: memory entries each position retrieves (D.3: 40).
        alpha: the input's weight in the feature shift (Eq. 2), or "adaptive" (Eq. 7).
        beta: the weight of zeta' added to every new value vector (Eq. 6).
        zeta: "truthful" (the paper), "none" (w/o zeta), "random" (a random direction of the
            truthful zeta's norm, seeded), "semantic" (the same construction in the semantic space).
        edit_in_memory: add each edit's own (h_sem, h_pos) to the external memory while it is live.
        positions: "all" shifts every position, "text" leaves image-token positions alone.
        ike_k: demonstrations of the vanilla-IKE ablation.
        seed: seed of the random zeta.
        layers, n_neurons, lr, steps, ...: `TPatcher`'s settings for the intrinsic half (defaults
            here: the last four layers, 10 neurons each, D.3).
    """

    def __init__(
        self,
        knowledge: str | None = None,
        encoders: str | None = None,
        intrinsic: bool = True,
        external: External = "latent",
        top_k: int = 40,
        alpha: float | Literal["adaptive"] = "adaptive",
        beta: float = 1.0,
        zeta: ZetaMode = "truthful",
        edit_in_memory: bool = True,
        positions: Literal["all", "text"] = "all",
        ike_k: int = 2,
        seed: int = 0,
        layers: list[int] | None = None,
        n_neurons: int = 10,
        name: str = "UniKE",
        **tpatcher: Any,
    ) -> None:
        super().__init__(
            layers=[-4, -3, -2, -1] if layers is None else layers, n_neurons=n_neurons, name=name, **tpatcher
        )
        problems = []
        if external not in ("latent", "vanilla", "none"):
            problems.append(f"external must be 'latent', 'vanilla' or 'none', got {external!r}")
        if zeta not in ("truthful", "none", "random", "semantic"):
            problems.append(f"zeta must be 'truthful', 'none', 'random' or 'semantic', got {zeta!r}")
        if alpha != "adaptive" and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
            problems.append(f"alpha must be in [0, 1] or 'adaptive', got {alpha!r}")
        if top_k < 1:
            problems.append(f"top_k must be >= 1, got {top_k}")
        if not intrinsic and external == "none":
            problems.append("intrinsic: false with external: none edits nothing")
        if external == "latent" and knowledge is None:
            problems.append("external: latent needs `knowledge` (the folder python -m knowledge.mine wrote)")
        if intrinsic and zeta != "none" and beta != 0 and knowledge is None:
            problems.append(f"zeta: {zeta} needs `knowledge` (its states); set zeta: none or beta: 0")
        if zeta in ("truthful", "semantic", "random") and beta != 0 and intrinsic and encoders is None:
            problems.append(f"zeta: {zeta} needs `encoders` (the contrastive encoders' checkpoint)")
        if alpha == "adaptive" and external == "latent" and encoders is None:
            problems.append("alpha: adaptive needs `encoders` (the semantic encoder)")
        if external == "vanilla" and self.memory_file is None:
            problems.append("external: vanilla draws IKE's demonstrations from memory_file; give it")
        if problems:
            raise ValueError("UniKE: " + "; ".join(problems))
        self.knowledge = knowledge
        self.encoders_path = encoders
        self.intrinsic = intrinsic
        self.external = external
        self.top_k = top_k
        self.alpha = alpha
        self.beta = beta
        self.zeta = zeta
        self.edit_in_memory = edit_in_memory
        self.positions = positions
        self.ike_k = ike_k
        self.seed = seed
        # Built per backbone in `setup`.
        self._unike_for: int | None = None
        self._states: KnowledgeStates | None = None
        self._encoders: KnowledgeEncoders | None = None
        self._latent: LatentKnowledge | None = None
        self._shift: dict[int, Tensor] = {}
        self._ike: IKE | None = None

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "knowledge": self.knowledge,
            "encoders": self.encoders_path,
            "intrinsic": self.intrinsic,
            "external": self.external,
            "top_k": self.top_k,
            "alpha": self.alpha,
            "beta": self.beta,
            "zeta": self.zeta,
            "edit_in_memory": self.edit_in_memory,
            "positions": self.positions,
            "ike_k": self.ike_k,
            "seed": self.seed,
        }

    # ----------------------------------------------------------------- setup
    def setup(self, vlm: VLM) -> None:
        """T-Patcher's memory, then the knowledge states, encoders, latent memory and zeta' (once per backbone)."""
        super().setup(vlm)
        if self._unike_for == id(vlm):
            return
        if self.knowledge is not None:
            self._states = load_knowledge_states(self.knowledge, vlm)
            missing = [layer for layer in self.layers if _layer_of(self._states.layers, layer, vlm) is None]
            if missing:
                raise ValueError(
                    f"UniKE: the knowledge states in {self.knowledge} hold layers {self._states.layers}, "
                    f"not {missing}; mine them at UniKE's layers {self.layers}"
                )
        if self.encoders_path is not None:
            # Frozen: an edit trains only its neurons (a graph through the encoders would also be kept
            # alive by the frozen-output reuse of the first replayed layer).
            self._encoders = (
                load_encoders(self.encoders_path, vlm).to(vlm.device).eval().requires_grad_(False)
            )
        self._latent = self._build_latent(vlm) if self.external == "latent" else None
        self._shift = self._value_shifts(vlm) if self.intrinsic else {}
        if self.external == "vanilla":
            self._ike = IKE(
                train_file=self.memory_file,
                image_root=self.image_root,
                format=self.format,
                k=self.ike_k,
                prompt_template=self.prompt_template,
                max_records=self.max_records,
                on_bad_record=self.on_bad_record,
            )
            self._ike.setup(vlm)
        self._unike_for = id(vlm)

    def _state_rows(self, kind: str, layer: int, vlm: VLM) -> Tensor:
        assert self._states is not None
        stored = _layer_of(self._states.layers, layer, vlm)
        return getattr(self._states, kind)[stored]

    def _build_latent(self, vlm: VLM) -> LatentKnowledge:
        encoders = self._encoders
        semantic = None
        if encoders is not None:

            def semantic(layer: int, h: Tensor) -> Tensor:
                # The encoder computes in float32 whatever the backbone's dtype.
                return encoders.semantic(layer, h.float()).to(h.dtype)

        return LatentKnowledge(
            vlm,
            self.layers,
            keys={layer: self._state_rows("sem", layer, vlm) for layer in self.layers},
            values={layer: self._state_rows("pos", layer, vlm) for layer in self.layers},
            top_k=self.top_k,
            alpha=self.alpha,
            semantic=semantic,
            positions=self.positions,
        )

    @torch.no_grad()
    def _value_shifts(self, vlm: VLM) -> dict[int, Tensor]:
        """beta * zeta' per patched layer (by non-negative index); empty when there is no shift."""
        if self.zeta == "none" or self.beta == 0:
            return {}
        assert self._states is not None and self._encoders is not None
        n = vlm.num_language_layers
        shifts: dict[int, Tensor] = {}
        generator = torch.Generator().manual_seed(self.seed)
        for layer in self.layers:
            truthful = self._encoders.zeta(layer, self._states).float().cpu()
            if self.zeta == "truthful":
                direction = truthful
            elif self.zeta == "semantic":
                # Fig. 4c's "semantic zeta": the same construction in the semantic space, whose
                # encoder already maps into the representation space (no W_zeta needed).
                pos = self._encoders.semantic(
                    layer, self._state_rows("pos", layer, vlm).to(vlm.device).float()
                )
                neg = self._encoders.semantic(
                    layer, self._state_rows("neg", layer, vlm).to(vlm.device).float()
                )
                direction = (pos.mean(0) - neg.mean(0)).cpu()
            else:
                # A random direction of the truthful zeta's length: only the direction differs.
                noise = torch.randn(truthful.shape, generator=generator)
                direction = noise * (truthful.norm() / noise.norm().clamp_min(1e-12))
            shifts[layer % n] = (self.beta * direction).to(vlm.device)
        return shifts

    def new_patch(self, vlm: VLM, layer: int, queries: Tensor) -> NeuronPatch:
        """T-Patcher's initialisation, with the new values shifted by beta * zeta' (Eq. 6)."""
        patch = initialised_patch(queries, ffn_width(vlm), self.activation, self._dtype(vlm))
        shift = self._shift.get(layer)
        if shift is not None:
            patch.value_shift = shift.to(patch.values.dtype)
        return patch

    # ----------------------------------------------------------------- editing
    def edit_states(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[int, dict[str, Tensor]]:
        """Each edit's own (h_sem, h_pos) at the memory layers, from the model before these edits."""
        probes: list[Probe] = [edit for case in cases for edit in case.edits]
        states = extract_states(vlm, probes, [p.answer for p in probes], None, self.layers)
        return {layer: {"sem": states["sem"][layer], "pos": states["pos"][layer]} for layer in self.layers}

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> UniKEHandle:
        self.setup(vlm)
        start = time.perf_counter()
        latent = self._latent
        handle = UniKEHandle(self, None, None, latent, [], None, {})
        try:
            if latent is not None:
                if self.edit_in_memory and cases:
                    # Read before the shift is attached: the edit's states as the model holds them.
                    self._remember(vlm, handle, cases)
                handle.hooks = latent.attach()
            if self.intrinsic:
                # The neurons train with the shift live (section 3.2's collaboration: the FFN sees the
                # states the external knowledge already moved).
                handle.patches = super().apply(vlm, cases)
            if self._ike is not None:
                with _unpatched(handle):
                    handle.context = self._ike.apply(vlm, cases)
        except BaseException:
            handle.restore()
            raise
        self._record_stats(handle, time.perf_counter() - start)
        return handle

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> UniKEHandle:
        """Add `cases` to a live UniKE state: their memory entries, neurons and (ablation) contexts.

        Each edit's own states are read with the earlier edits' shift and neurons off, as `apply`
        reads them on the unedited model. One difference from a single `apply` of the whole
        sequence, which a lifelong sequence cannot avoid: there every edit's states enter the memory
        before any neuron trains, so earlier edits train with later edits' entries retrievable;
        here an edit's entries arrive with it. With `edit_in_memory: false` the two are the same.
        """
        if not isinstance(handle, UniKEHandle) or handle.editor is not self:
            handle.restore()
            raise TypeError("UniKE.extend: the handle was not made by this editor's apply")
        start = time.perf_counter()
        try:
            if handle.latent is not None and self.edit_in_memory and cases:
                if handle.hooks is not None:
                    handle.hooks.remove()
                    handle.hooks = None
                with _unpatched(handle):
                    self._remember(vlm, handle, cases)
                handle.hooks = handle.latent.attach()
            if handle.patches is not None:
                TPatcher.extend(self, vlm, handle.patches, cases)
            if handle.context is not None and self._ike is not None:
                with _unpatched(handle):
                    handle.context = self._ike.extend(vlm, handle.context, cases)
        except BaseException:
            handle.restore()
            raise
        self._record_stats(handle, time.perf_counter() - start)
        return handle

    def _remember(self, vlm: VLM, handle: UniKEHandle, cases: Sequence[EditCase]) -> None:
        """Put the cases' own (h_sem, h_pos) into the external memory, under a token the handle keeps."""
        assert handle.latent is not None
        with torch.inference_mode(False), torch.no_grad():
            own = self.edit_states(vlm, cases)
        handle.tokens.append(
            handle.latent.add(
                {layer: s["sem"] for layer, s in own.items()},
                {layer: s["pos"] for layer, s in own.items()},
            )
        )

    def _record_stats(self, handle: UniKEHandle, seconds: float) -> None:
        stats: dict[str, object] = dict(handle.patches.stats) if handle.patches is not None else {}
        stats["time_s"] = float(handle.stats.get("time_s", 0.0)) + seconds  # type: ignore[arg-type]
        stats.setdefault("steps", 0)
        stats.setdefault("final_loss", math.nan)
        if handle.latent is not None:
            stats["memory_entries"] = handle.latent.size(self.layers[-1])
        handle.stats = stats


class UniKEHandle(EditHandle):
    """A live UniKE state: its neurons, the feature shift and the edits' memory entries (and IKE's context)."""

    def __init__(
        self,
        editor: UniKE,
        patches: PatchEditHandle | None,
        hooks: LatentHandle | None,
        latent: LatentKnowledge | None,
        tokens: list[int],
        context: EditHandle | None,
        stats: dict[str, object],
    ) -> None:
        super().__init__(stats)
        self.editor = editor
        self.patches = patches
        self.hooks = hooks
        self.latent = latent
        #: One per `apply` / `extend` call that added edit states to the memory.
        self.tokens = tokens
        self.context = context

    def prepare(self, probes: Sequence[Probe]) -> list[Probe]:
        return self.context.prepare(probes) if self.context is not None else list(probes)

    def restore(self) -> None:
        if self.patches is not None:
            self.patches.restore()
        if self.hooks is not None:
            self.hooks.remove()
        if self.latent is not None:
            for token in reversed(self.tokens):
                self.latent.remove(token)
        self.patches = self.hooks = None
        self.tokens = []


def _unpatched(handle: UniKEHandle) -> contextlib.AbstractContextManager[None]:
    """The handle's neurons switched off for the block (the shift is the caller's to take off).

    The vanilla ablation's IKE embeds its facts for retrieval here, on the model as IKE alone sees
    it: otherwise a fact's key would depend on how many edits' neurons were live when it came, and
    one `apply` of a sequence and the same sequence added edit by edit would retrieve differently.
    """
    return handle.patches.patches.paused() if handle.patches is not None else contextlib.nullcontext()


def _layer_of(stored: Sequence[int], layer: int, vlm: VLM) -> int | None:
    """The entry of `stored` (layer ints as mined) naming the same layer as `layer`, or None."""
    n = vlm.num_language_layers
    return next((s for s in stored if s % n == layer % n), None)
