"""T-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each edit adds a few key-value neurons (a `NeuronPatch`, `editors/added_neurons.py`) to the FFN of
the chosen language layers (the last one by default) and trains only those neurons; no backbone
weight ever changes, so `restore()` is taking the hooks off. The patch must (i) make the model give
the new answer (edit loss), (ii) fire on the edit (activation loss) and (iii) stay silent on
everything else (memory loss), which T-Patcher states on a memory of FFN inputs q of unrelated
inputs the model has learned. With s = q @ key + bias a neuron's score (its pre-activation),
S_k(x) the mean of exp over the k largest entries of x, and s_e the score at the edit's position:

    L = L_edit + a * S_ka(m_a - s_e) + m * [ S_km(s_mem - beta) + S_km(s_mem - s_e + gamma) ]

The first memory term keeps every memory score below beta (a ReLU neuron is then exactly off), the
second keeps the edit's score at least gamma above every memory score. The key is initialised
from the edit: key = q_e / ||q_e||^2 and bias 0, so the neuron starts with score 1 on the edit.

Reference settings (paper and its public code; BART/BERT on zsRE/FEVER): Adam, lr 1e-2 (weight
decay 0.01, gradient clipping 5), a = 1, m = 10 (zsRE; 5 on FEVER), m_a = 0, beta = -3, gamma =
3, k_a = 5, k_m = 1000, one neuron per erroneous token, up to 2000 steps with early stopping once
the edit is fixed, memory of 40,000 training inputs (every decoder token), and the edited
example added to the memory after each edit. Values start N(0, 1) times a trainable amplifier
initialised to 10; here they start at zero (the patch then starts as an exact no-op, and several
patched layers can be initialised from one forward), and the step budget is fixed, as FT's is.

The memory here: every probe of the records of a training annotation file (`memory_file`; edit,
rephrase, other-image, locality and portability questions with their answers), their FFN inputs at
the patched layers at every text position, computed once in `setup` (batched, no gradient) and
kept, so an edit's memory terms cost no forward pass. An evaluated case's own probes never enter
it (that would leak the locality score into training).

Speed: only the patched layers and the final modules run per step (the frozen part below the
lowest patched layer runs once per case, `backbones/frozen_prefix.PrefixCachedLoss`, with the
first replayed layer's frozen parts answering from their first output), and the replay's first
loss is checked against the full forward's bit for bit, falling back to the whole model otherwise.
This is not `vlm.training_loss(params)`: that decides which layers to replay from where the
trained tensors sit in the backbone, and the patch's tensors sit in no backbone module.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Literal

import torch
from torch import Tensor

from backbones.base import VLM
from backbones.batching import ProbeBatch
from backbones.frozen_prefix import PrefixCachedLoss
from core.case import EditCase, Probe
from editors.added_neurons import (
    ACTIVATIONS,
    NeuronPatch,
    PatchHandle,
    capture_ffn_inputs,
    ffn_width,
    patch_training_loss,
)
from editors.base import EditHandle, Editor
from editors.training_split import ReadsTrainingSplit, split_option_problems
from editors.tuning import only_these_trainable

PatchDtype = Literal["float32", "model"]


class TPatcher(ReadsTrainingSplit, Editor):
    """T-Patcher: per edit, train `n_neurons` added FFN neurons per layer of `layers`; weights untouched.

    Args:
        memory_file: annotation file of the training split whose probes form the memory of
            unrelated inputs (read by the project's loaders, like IKE's `train_file`).
        image_root: folder the memory records' image paths are relative to.
        format: dataset format of `memory_file` ("auto" detects it).
        prompt_template: template the loader applies to prompts (as the evaluated data's).
        loc_image_template: template for image-locality questions (as the evaluated data's).
        max_records: read only the first N records of `memory_file` (None: all).
        on_bad_record: the loader's policy for malformed memory records: "error" or "skip".
        memory_size: at most this many FFN inputs per patched layer are kept (evenly strided over
            all the memory's text positions when there are more).
        memory_image_tokens: also keep the FFN inputs at image-token positions (576 per image on
            LLaVA-1.5, so off by default; the scored positions are text).
        layers: language layers whose FFN gets neurons (negative: from the last; T-Patcher: [-1]).
        n_neurons: neurons added per layer and edited fact ("one mistake worth one neuron"; a case
            with extra edits gets n_neurons for each). Neuron j is initialised from, and asked to
            fire at, the j-th anchor: each fact's last prompt token first, then the answer
            positions in order (T-Patcher gives each wrong token a neuron).
        activation: the added neurons' activation: "relu" (T-Patcher), "gelu" or "silu".
        lr: Adam learning rate (reference 1e-2).
        steps: Adam steps per edit (a fixed budget, recorded; fewer with `stop_loss`).
        weight_decay: Adam's L2 weight decay on the patch (reference 0.01).
        activation_weight: a, weight of the activation loss that makes the neuron fire on the edit.
        memory_weight: m, weight of the memory loss that keeps it silent on the memory.
        activation_margin: m_a, the score the edit's anchor should exceed.
        memory_margin: beta, the score every memory input should stay below (<= 0).
        gap_margin: gamma, how far the edit's score should stay above every memory score (>= 0).
        activation_top_k: k_a, the activation loss averages its k largest terms.
        memory_top_k: k_m, each memory term averages its k largest terms.
        stop_loss: stop an edit once its answer NLL falls below this (None: the whole budget).
        update_memory: in a sequence of edits, add each edited input's FFN inputs to the memory
            for the later edits of the sequence, so a later patch stays off an earlier edit.
        patch_dtype: "float32" (the patch trains in float32 on a bf16/fp16 backbone too) or "model".
        name: recorded in results.

    Build the memory from in-memory cases instead of a file with `TPatcher.from_cases(cases, ...)`.
    """

    side_by_side = False

    def __init__(
        self,
        memory_file: str | None = None,
        image_root: str = "",
        format: str = "auto",
        prompt_template: str | None = None,
        loc_image_template: str | None = None,
        max_records: int | None = None,
        on_bad_record: str = "error",
        memory_size: int = 20000,
        memory_image_tokens: bool = False,
        layers: list[int] | None = None,
        n_neurons: int = 1,
        activation: str = "relu",
        lr: float = 1e-2,
        steps: int = 40,
        weight_decay: float = 0.0,
        activation_weight: float = 1.0,
        memory_weight: float = 10.0,
        activation_margin: float = 0.0,
        memory_margin: float = -3.0,
        gap_margin: float = 3.0,
        activation_top_k: int = 5,
        memory_top_k: int = 1000,
        stop_loss: float | None = None,
        update_memory: bool = True,
        patch_dtype: PatchDtype = "float32",
        name: str = "T-Patcher",
    ) -> None:
        layers = [-1] if layers is None else list(layers)
        problems = []
        if not layers:
            problems.append("layers is empty; name at least one language layer, e.g. [-1]")
        if len(set(layers)) != len(layers):
            problems.append(f"layers {layers} names a layer twice")
        if n_neurons < 1:
            problems.append(f"n_neurons must be >= 1, got {n_neurons}")
        if activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not lr > 0:
            problems.append(f"lr must be > 0, got {lr}")
        if steps < 0:
            problems.append(f"steps must be >= 0, got {steps}")
        for key, value in (
            ("weight_decay", weight_decay),
            ("activation_weight", activation_weight),
            ("memory_weight", memory_weight),
        ):
            if not value >= 0:
                problems.append(f"{key} must be >= 0, got {value}")
        if memory_margin > 0:
            problems.append(
                f"memory_margin (beta) must be <= 0 so that a ReLU neuron is off, got {memory_margin}"
            )
        if gap_margin < 0:
            problems.append(f"gap_margin (gamma) must be >= 0, got {gap_margin}")
        if activation_top_k < 1 or memory_top_k < 1:
            problems.append(
                f"activation_top_k and memory_top_k must be >= 1, got {activation_top_k}, {memory_top_k}"
            )
        if memory_size < 1:
            problems.append(f"memory_size must be >= 1, got {memory_size}")
        problems += split_option_problems(max_records, on_bad_record)
        if patch_dtype not in ("float32", "model"):
            problems.append(f"patch_dtype must be 'float32' or 'model', got {patch_dtype!r}")
        if problems:
            raise ValueError("TPatcher: " + "; ".join(problems))
        self.memory_file = memory_file
        self.image_root = image_root
        self.format = format
        self.prompt_template = prompt_template
        self.loc_image_template = loc_image_template
        self.max_records = max_records
        self.on_bad_record = on_bad_record
        self.memory_size = memory_size
        self.memory_image_tokens = memory_image_tokens
        self.layers = layers
        self.n_neurons = n_neurons
        self.activation = activation
        self.lr = lr
        self.steps = steps
        self.weight_decay = weight_decay
        self.activation_weight = activation_weight
        self.memory_weight = memory_weight
        self.activation_margin = activation_margin
        self.memory_margin = memory_margin
        self.gap_margin = gap_margin
        self.activation_top_k = activation_top_k
        self.memory_top_k = memory_top_k
        self.stop_loss = stop_loss
        self.update_memory = update_memory
        self.patch_dtype = patch_dtype
        self.name = name
        #: FFN inputs of the memory per (non-negative) patched layer, [N, hidden], patch dtype.
        self.memory: dict[int, Tensor] = {}
        self._built_for: weakref.ref[VLM] | None = None

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "memory_file": self.memory_file,
            "format": self.format,
            "prompt_template": self.prompt_template,
            "loc_image_template": self.loc_image_template,
            "max_records": self.max_records,
            "memory_size": self.memory_size,
            "memory_image_tokens": self.memory_image_tokens,
            "layers": self.layers,
            "n_neurons": self.n_neurons,
            "activation": self.activation,
            "lr": self.lr,
            "steps": self.steps,
            "weight_decay": self.weight_decay,
            "activation_weight": self.activation_weight,
            "memory_weight": self.memory_weight,
            "activation_margin": self.activation_margin,
            "memory_margin": self.memory_margin,
            "gap_margin": self.gap_margin,
            "activation_top_k": self.activation_top_k,
            "memory_top_k": self.memory_top_k,
            "stop_loss": self.stop_loss,
            "update_memory": self.update_memory,
            "patch_dtype": self.patch_dtype,
        }

    # ----------------------------------------------------------------- memory
    def _load_memory_cases(self) -> list[EditCase]:
        cases = self.read_split(
            self.memory_file, "memory_file", "a training split whose inputs the patches must stay silent on"
        )
        if not cases:
            raise ValueError(f"TPatcher: the memory ({self.memory_file or 'from_cases'}) holds no records")
        return cases

    def _layer_indices(self, vlm: VLM) -> list[int]:
        n = vlm.num_language_layers
        for layer in self.layers:
            if not -n <= layer < n:
                raise ValueError(f"TPatcher: layer {layer} does not exist; the language model has {n} layers")
        indices = [layer % n for layer in self.layers]
        if len(set(indices)) != len(indices):
            raise ValueError(f"TPatcher: layers {self.layers} name the same layer twice on a {n}-layer model")
        return indices

    def _dtype(self, vlm: VLM) -> torch.dtype:
        return torch.float32 if self.patch_dtype == "float32" else next(vlm.model.parameters()).dtype

    def setup(self, vlm: VLM) -> None:
        """Read the memory records and keep their FFN inputs at the patched layers (once per backbone)."""
        if self._built_for is not None and self._built_for() is vlm:
            return
        layers = self._layer_indices(vlm)
        cases = self._load_memory_cases()
        probes = [p for case in cases for p in case.all_probes()]
        # Outside inference mode: the memory later meets trainable keys in autograd, which refuses
        # inference tensors (Lightning's test loop runs its hooks under inference mode).
        with torch.inference_mode(False), torch.no_grad():
            parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
            order = sorted(range(len(probes)), key=lambda i: _length_key(probes[i]))
            for start in range(0, len(order), vlm.max_batch_size):
                chunk = [probes[i] for i in order[start : start + vlm.max_batch_size]]
                for layer, q in self._text_queries(vlm, chunk, layers).items():
                    parts[layer].append(q)
            dtype = self._dtype(vlm)
            self.memory = {
                layer: _strided(torch.cat(parts[layer]), self.memory_size).to(dtype) for layer in layers
            }
        self._built_for = weakref.ref(vlm)

    def _text_queries(self, vlm: VLM, probes: Sequence[Probe], layers: Sequence[int]) -> dict[int, Tensor]:
        """FFN inputs at each layer at the probes' positions the memory keeps, [N, hidden] per layer."""
        batch = vlm.build_batch(probes)
        with capture_ffn_inputs(vlm, layers) as captured:
            vlm.model(**batch.inputs, use_cache=False)
        return self._kept(vlm, batch, captured)

    def _kept(self, vlm: VLM, batch: ProbeBatch, captured: dict[int, Tensor]) -> dict[int, Tensor]:
        """The captured FFN inputs at the positions the memory keeps: text (and image tokens if asked)."""
        ids = batch.inputs["input_ids"]
        keep = batch.inputs["attention_mask"].bool()
        if not self.memory_image_tokens:
            keep &= ids != vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
        # OPT hands its FFN the rows flattened ([batch * seq, hidden]); the reshape covers both layouts.
        return {layer: q.reshape(*ids.shape, -1)[keep] for layer, q in captured.items()}

    # ----------------------------------------------------------------- editing
    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> PatchEditHandle:
        self.setup(vlm)
        handle = PatchEditHandle(PatchHandle(vlm), {"time_s": 0.0, "steps": 0, "cases": []})
        handle.memory = dict(self.memory)
        self._edit_cases(vlm, handle, cases)
        return handle

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> PatchEditHandle:
        """More patches on the live hooks, trained against the memory the sequence has grown so far."""
        if not isinstance(handle, PatchEditHandle) or handle.memory is None:
            handle.restore()
            raise TypeError(f"{type(self).__name__}.extend: the handle was not made by its apply")
        self._edit_cases(vlm, handle, cases)
        return handle

    def _edit_cases(self, vlm: VLM, handle: PatchEditHandle, cases: Sequence[EditCase]) -> None:
        """Add and train each case's patches in order; the handle's memory grows by each edit's inputs.

        The memory lives in the handle, so a case added by `extend` trains against the same memory
        (training inputs plus every earlier edit's) as it would have in one `apply` call.
        """
        layers = self._layer_indices(vlm)
        memory = handle.memory
        assert memory is not None
        start = time.perf_counter()
        per_case: list[dict[str, object]] = handle.stats["cases"]  # type: ignore[assignment]
        try:
            # Lightning runs test loops under inference mode; an edit needs autograd whatever the caller.
            with torch.inference_mode(False), torch.enable_grad(), only_these_trainable(vlm.model, {}):
                for case in cases:
                    # The previous edit's inputs join the memory only now that another edit follows:
                    # a one-step case never pays for copying the memory.
                    if handle.pending is not None:
                        for layer in layers:
                            memory[layer] = torch.cat(
                                [memory[layer], handle.pending[layer].to(memory[layer].dtype)]
                            )
                        handle.pending = None
                    stats, edit_queries = self._edit_one(vlm, handle.patches, layers, memory, case)
                    per_case.append(stats)
                    if self.update_memory:
                        handle.pending = edit_queries
        except BaseException:
            # No handle reaches the caller when an edit fails: take the patches off here, so a
            # half-trained patch never leaks into the next case.
            handle.restore()
            raise
        handle.stats.update(
            {
                "time_s": float(handle.stats["time_s"]) + time.perf_counter() - start,  # type: ignore[arg-type]
                "steps": sum(int(c["steps"]) for c in per_case),  # type: ignore[call-overload]
                "final_loss": per_case[-1]["final_loss"] if per_case else math.nan,
                "neurons": sum(p.n_neurons for p in handle.patches.all_patches()),
            }
        )

    def _edit_one(
        self, vlm: VLM, handle: PatchHandle, layers: list[int], memory: dict[int, Tensor], case: EditCase
    ) -> tuple[dict[str, object], dict[int, Tensor]]:
        """Add and train this case's patches; returns its stats and its edit inputs' FFN inputs."""
        start = time.perf_counter()
        probes = case.edits
        batch = vlm.build_batch(probes)
        # One mistake worth n neurons: a case that writes several facts (VLKEB's one-hop setting)
        # gets n_neurons per fact, each fact's last prompt token anchoring one of them first.
        n = self.n_neurons * len(probes)
        anchors = _anchors(batch, n)
        rows = torch.tensor([r for r, _ in anchors], device=vlm.device)
        cols = torch.tensor([c for _, c in anchors], device=vlm.device)
        neuron = torch.arange(n, device=vlm.device)
        shape = batch.inputs["input_ids"].shape
        with ExitStack() as stack:
            # The loss closure's first forward (the whole model, before this case's patches exist;
            # earlier cases' patches attached) also hands over the FFN inputs: the keys'
            # initialisation, and what later edits of a sequence keep out of (the memory update).
            with torch.no_grad(), capture_ffn_inputs(vlm, layers) as captured:
                edit_nll, replay = self._edit_loss(vlm, probes, batch, min(layers), stack)
            if replay is not None:
                # The replay checks its first loss against the full forward it recorded, so that
                # call runs before this case's patches change what the layers compute (a patch
                # whose values start shifted, as UniKE's, is no no-op).
                with torch.no_grad():
                    edit_nll()
            at_anchor = {layer: q.reshape(*shape, -1)[rows, cols] for layer, q in captured.items()}
            edit_queries = self._kept(vlm, batch, captured)
            del captured
            patches: dict[int, NeuronPatch] = {}
            for layer in layers:
                patches[layer] = self.new_patch(vlm, layer, at_anchor[layer])
                handle.add(layer, patches[layer])
            params = [p for patch in patches.values() for p in patch.parameters()]
            # Fused where torch has the kernel (CPU, CUDA): one kernel per step, not a dozen ops per tensor.
            fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
            optim = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)

            def objective() -> dict[str, Tensor]:
                """One forward: the edit NLL, and the patches' losses from the scores it recorded."""
                with handle.recording() as recorded:
                    nll = edit_nll()
                act = mem = torch.zeros((), device=vlm.device)
                edit_min, mem_max = [], []
                for layer, patch in patches.items():
                    scores = recorded[layer][handle.patches[layer].index(patch)].reshape(*shape, -1)
                    edit_scores = scores[rows, cols, neuron]  # [n]: neuron j at its own anchor
                    mem_scores = patch.scores(memory[layer])  # [N, n]: no forward pass needed
                    act = act + _top_k_exp_mean(self.activation_margin - edit_scores, self.activation_top_k)
                    mem = mem + self._memory_loss(mem_scores, edit_scores)
                    edit_min.append(edit_scores.detach().min())
                    mem_max.append(
                        mem_scores.detach().max() if mem_scores.numel() else edit_scores.new_tensor(-math.inf)
                    )
                return {
                    "loss": nll + self.activation_weight * act + self.memory_weight * mem,
                    "edit_nll": nll,
                    "activation_loss": act,
                    "memory_loss": mem,
                    "edit_score": torch.stack(edit_min).min(),
                    "memory_max_score": torch.stack(mem_max).max(),
                }

            initial = math.nan
            steps_used = 0
            # steps + 1 forwards: the last only measures the edited model (as FT records it).
            for step in range(self.steps + 1):
                last = step == self.steps
                with torch.set_grad_enabled(not last):
                    terms = objective()
                if step == 0:
                    initial = terms["loss"].item()
                # Read back (a device sync) only where a number is needed.
                if last or (self.stop_loss is not None and terms["edit_nll"].item() < self.stop_loss):
                    break
                optim.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optim.step()
                steps_used += 1
        final = {key: value.item() for key, value in terms.items()}
        for p in params:
            p.requires_grad_(False)  # frozen: later edits of a sequence train only their own neurons
            p.grad = None
        stats: dict[str, object] = {
            "case_id": case.case_id,
            "steps": steps_used,
            "initial_loss": initial,
            "final_loss": final["loss"],
            "final_edit_nll": final["edit_nll"],
            "final_activation_loss": final["activation_loss"],
            "final_memory_loss": final["memory_loss"],
            # Scores (pre-activations) after the edit: the lowest of its neurons at their anchors,
            # and the highest any of them reaches on the memory.
            "edit_score": final["edit_score"],
            "memory_max_score": final["memory_max_score"],
            "memory_entries": {layer: int(memory[layer].shape[0]) for layer in layers},
            # The first language layer run per step (None: the whole model ran at every step).
            "replayed_from_layer": replay.first_layer if replay is not None and replay.cached else None,
            "time_s": time.perf_counter() - start,
        }
        return stats, edit_queries

    def _memory_loss(self, mem_scores: Tensor, edit_scores: Tensor) -> Tensor:
        """S_km(s_mem - beta) + S_km(s_mem - s_e + gamma) for one layer's patch ([N, n] and [n] scores)."""
        k = min(self.memory_top_k, mem_scores.numel())
        if not k:
            return mem_scores.sum()
        if mem_scores.shape[-1] == 1:
            # One neuron: both terms rank the memory by the same score, so one top-k serves both
            # (the top-k is the largest cost of a step on a memory of thousands of inputs).
            top = mem_scores.flatten().topk(k).values
            return (top - self.memory_margin).exp().mean() + (
                top - edit_scores + self.gap_margin
            ).exp().mean()
        below = _top_k_exp_mean(mem_scores - self.memory_margin, k)
        return below + _top_k_exp_mean(mem_scores - edit_scores + self.gap_margin, k)

    def new_patch(self, vlm: VLM, layer: int, queries: Tensor) -> NeuronPatch:
        """This edit's patch for `layer` (non-negative index), from its neurons' anchor queries [n, hidden].

        T-Patcher's initialisation; methods built on T-Patcher (UniKE) override it to shape the
        new neurons further (UniKE shifts their values).
        """
        return initialised_patch(queries, ffn_width(vlm), self.activation, self._dtype(vlm))

    def _edit_loss(
        self, vlm: VLM, probes: Sequence[Probe], batch: ProbeBatch, first_layer: int, stack: ExitStack
    ) -> tuple[Callable[[], Tensor], PrefixCachedLoss | None]:
        """The edit's answer NLL as a closure (and its replay, if any); building it runs the whole model once."""
        return patch_training_loss(vlm, probes, batch, first_layer, stack)


class PatchEditHandle(EditHandle):
    """The patches of one sequence; restoring takes their hooks off (no weight was changed).

    `memory`: T-Patcher's memory as the sequence has grown it (FFN inputs per layer), so `extend`
    trains the next patch against it; None for handles whose editor keeps no such memory.
    `pending`: the last edit's inputs, added to the memory when the next edit comes.
    """

    def __init__(self, patches: PatchHandle, stats: dict[str, object]) -> None:
        super().__init__(stats)
        self.patches = patches
        self.memory: dict[int, Tensor] | None = None
        self.pending: dict[int, Tensor] | None = None

    def restore(self) -> None:
        self.patches.remove()


def _anchors(batch: ProbeBatch, n: int) -> list[tuple[int, int]]:
    """(row, position) of each of n neurons: every edit's last prompt token, then its answer positions.

    Position t predicts token t + 1, so an answer spanning s..e-1 is predicted at s-1..e-2; the
    neurons cycle through these when there are fewer positions than neurons.
    """
    firsts = [(row, s - 1) for row, (s, _) in enumerate(batch.answer_spans)]
    rest = [(row, t) for row, (s, e) in enumerate(batch.answer_spans) for t in range(s, e - 1)]
    positions = firsts + rest
    return [positions[j % len(positions)] for j in range(n)]


def initialised_patch(queries: Tensor, hidden: int, activation: str, dtype: torch.dtype) -> NeuronPatch:
    """T-Patcher's initialisation: key j = q_j / ||q_j||^2 (score 1 on its anchor), bias 0, values 0."""
    patch = NeuronPatch(hidden, queries.shape[0], activation, device=queries.device, dtype=dtype)
    q = queries.to(dtype)
    with torch.no_grad():
        patch.keys.copy_((q / q.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)).T)
    return patch


def _top_k_exp_mean(x: Tensor, k: int) -> Tensor:
    """T-Patcher's S_k: the mean of exp over the k largest entries of x (0 for an empty x)."""
    flat = x.flatten()
    if not flat.numel():
        return flat.sum()
    return flat.topk(min(k, flat.numel())).values.exp().mean()


def _strided(rows: Tensor, size: int) -> Tensor:
    """At most `size` rows, evenly strided (deterministic, spread over every record)."""
    if rows.shape[0] <= size:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, size, device=rows.device).round().long()]


def _length_key(probe: Probe) -> tuple[int, int]:
    """Group probes of similar length into a batch (images first, then characters) to pad little."""
    images = sum(item.image is not None for item in probe.context) + (probe.image is not None)
    return images, len(probe.prompt) + len(probe.answer)
