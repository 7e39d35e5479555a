"""CaliNet (Dong et al., Findings of EMNLP 2022, "Calibrating Factual Knowledge in Pretrained
Language Models"): a calibration memory of FFN-like slots added beside a language layer's FFN.

    FFN'(q) = FFN(q) + act(q @ K_c) @ V_c

The calibration memory (K_c, V_c: `n_slots` key-value slots, the public code's `wi_ex` / `wo_ex`,
64 slots with ReLU in the last decoder layer of T5) is trained on the facts to write while the
original model stays frozen (its code: Adafactor, lr 1e-2, constant schedule). Here the slots are
a `NeuronPatch` (`editors/added_neurons.py`) on the FFN of each layer of `layers`, so no backbone
tensor changes and `restore()` takes the hooks off. Keys start random (N(0, key_std^2), default
1/sqrt(hidden), a Linear layer's scale) and values at zero, so a fresh memory is an exact no-op;
Adam then trains keys and values on the edit's answer NLL for a fixed budget of steps.

What differs from T-Patcher (same hooks): CaliNet's slots are many and not tied to a position (no
key initialised from the edit, no activation or memory margins); it calibrates with the edit loss
alone. In sequential editing the memory is one for the whole sequence, as CaliNet trains one memory
on all its facts: each new edit trains it on that edit and, with `replay`, on the sequence's
earlier edits too (their edit probes, never their evaluation probes). The memory and the edits
seen live in the handle, so `extend` (lifelong editing) goes on training the same memory. With
`replay` an edit then trains on every earlier edit as well, so a sequence of N edits costs
O(N^2) rows of training in total, as one `apply` of N cases does: that is the method, not the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Literal

import torch

from backbones.base import VLM
from core.case import EditCase, Probe
from editors.added_neurons import ACTIVATIONS, NeuronPatch, PatchHandle, ffn_width, patch_training_loss
from editors.base import EditHandle, Editor
from editors.tpatcher import PatchEditHandle
from editors.tuning import only_these_trainable


class CaliNet(Editor):
    """CaliNet: train a calibration memory of `n_slots` FFN slots per layer of `layers` on the edits.

    Args:
        layers: language layers whose FFN gets a calibration memory (negative: from the last; CaliNet: [-1]).
        n_slots: slots per layer (reference 64).
        activation: the slots' activation: "relu" (the reference), "gelu" or "silu".
        lr: Adam learning rate (reference 1e-2).
        steps: Adam steps per edit (a fixed budget, recorded; fewer with `stop_loss`).
        weight_decay: Adam's L2 weight decay on the memory.
        key_std: standard deviation of the random initial keys (None: 1 / sqrt(hidden size)).
        replay: in a sequence, also train on the earlier edits' probes at each new edit.
        stop_loss: stop an edit once its training NLL falls below this (None: the whole budget).
        seed: seeds the keys, so an edit is reproducible.
        memory_dtype: "float32" (the memory trains in float32 on a bf16/fp16 backbone too) or "model".
        name: recorded in results.
    """

    side_by_side = False

    def __init__(
        self,
        layers: list[int] | None = None,
        n_slots: int = 64,
        activation: str = "relu",
        lr: float = 1e-2,
        steps: int = 40,
        weight_decay: float = 0.0,
        key_std: float | None = None,
        replay: bool = True,
        stop_loss: float | None = None,
        seed: int = 0,
        memory_dtype: Literal["float32", "model"] = "float32",
        name: str = "calinet",
    ) -> None:
        layers = [-1] if layers is None else list(layers)
        problems = []
        if not layers or len(set(layers)) != len(layers):
            problems.append(f"layers must name distinct layers, got {layers}")
        if n_slots < 1:
            problems.append(f"n_slots must be >= 1, got {n_slots}")
        if activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not lr > 0:
            problems.append(f"lr must be > 0, got {lr}")
        if steps < 0:
            problems.append(f"steps must be >= 0, got {steps}")
        if not weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {weight_decay}")
        if key_std is not None and not key_std > 0:
            problems.append(f"key_std must be > 0 or None, got {key_std}")
        if memory_dtype not in ("float32", "model"):
            problems.append(f"memory_dtype must be 'float32' or 'model', got {memory_dtype!r}")
        if problems:
            raise ValueError("CaliNet: " + "; ".join(problems))
        self.layers = layers
        self.n_slots = n_slots
        self.activation = activation
        self.lr = lr
        self.steps = steps
        self.weight_decay = weight_decay
        self.key_std = key_std
        self.replay = replay
        self.stop_loss = stop_loss
        self.seed = seed
        self.memory_dtype = memory_dtype
        self.name = name

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "layers": self.layers,
            "n_slots": self.n_slots,
            "activation": self.activation,
            "lr": self.lr,
            "steps": self.steps,
            "weight_decay": self.weight_decay,
            "key_std": self.key_std,
            "replay": self.replay,
            "stop_loss": self.stop_loss,
            "seed": self.seed,
            "memory_dtype": self.memory_dtype,
        }

    def layer_indices(self, vlm: VLM) -> list[int]:
        n = vlm.num_language_layers
        bad = [layer for layer in self.layers if not -n <= layer < n]
        if bad:
            raise ValueError(f"CaliNet: layers {bad} do not exist; the language model has {n} layers")
        indices = [layer % n for layer in self.layers]
        if len(set(indices)) != len(indices):
            raise ValueError(f"CaliNet: layers {self.layers} name the same layer twice on a {n}-layer model")
        return indices

    def new_memory(self, vlm: VLM) -> dict[int, NeuronPatch]:
        """A fresh calibration memory per layer: random keys, zero bias and values (an exact no-op)."""
        hidden = ffn_width(vlm)
        dtype = torch.float32 if self.memory_dtype == "float32" else next(vlm.model.parameters()).dtype
        generator = torch.Generator().manual_seed(self.seed)
        std = self.key_std if self.key_std is not None else 1.0 / math.sqrt(hidden)
        memory = {}
        for layer in self.layer_indices(vlm):
            patch = NeuronPatch(hidden, self.n_slots, self.activation, device=vlm.device, dtype=dtype)
            with torch.no_grad():
                keys = torch.randn(patch.keys.shape, generator=generator) * std
                patch.keys.copy_(keys.to(patch.keys.device, dtype))
            memory[layer] = patch
        return memory

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> CaliNetHandle:
        handle = CaliNetHandle(PatchHandle(vlm))
        try:
            with torch.inference_mode(False):
                handle.slots = self.new_memory(vlm)
            for layer, patch in handle.slots.items():
                handle.patches.add(layer, patch)
        except BaseException:
            handle.restore()
            raise
        self._train_cases(vlm, handle, cases)
        return handle

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> CaliNetHandle:
        """Train the sequence's one memory on `cases` too (with `replay`, on every earlier edit as well)."""
        if not isinstance(handle, CaliNetHandle):
            handle.restore()
            raise TypeError("CaliNet.extend: the handle was not made by CaliNet.apply")
        self._train_cases(vlm, handle, cases)
        return handle

    def _train_cases(self, vlm: VLM, handle: CaliNetHandle, cases: Sequence[EditCase]) -> None:
        """Train the handle's memory on each case in turn; the edits seen so far live in the handle."""
        start = time.perf_counter()
        per_case: list[dict[str, object]] = handle.stats["cases"]  # type: ignore[assignment]
        memory = handle.slots
        try:
            # Lightning runs test loops under inference mode; an edit needs autograd whatever the caller.
            with torch.inference_mode(False), torch.enable_grad(), only_these_trainable(vlm.model, {}):
                params = [p for patch in memory.values() for p in patch.parameters()]
                for case in cases:
                    handle.seen.extend(case.edits)
                    facts = list(handle.seen) if self.replay else list(case.edits)
                    per_case.append(self._train(vlm, params, facts, min(memory), case.case_id))
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
        except BaseException:
            # No handle reaches the caller when an edit fails: take the memory off here.
            handle.restore()
            raise
        handle.stats.update(
            {
                "time_s": float(handle.stats["time_s"]) + time.perf_counter() - start,  # type: ignore[arg-type]
                "steps": sum(int(c["steps"]) for c in per_case),  # type: ignore[call-overload]
                "final_loss": per_case[-1]["final_loss"] if per_case else math.nan,
                "slots": self.n_slots * len(self.layers),
            }
        )

    def _train(
        self, vlm: VLM, params: list[torch.nn.Parameter], facts: list[Probe], first_layer: int, case_id: str
    ) -> dict[str, object]:
        """`steps` Adam steps of the memory on the facts' answer NLL, then one forward for the final loss."""
        start = time.perf_counter()
        for p in params:
            p.requires_grad_(True)
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        optim = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        batch = vlm.build_batch(facts)
        initial = final = math.nan
        steps_used = 0
        with ExitStack() as stack:
            loss_fn, _replay = patch_training_loss(vlm, facts, batch, first_layer, stack)
            for step in range(self.steps + 1):
                last = step == self.steps
                with torch.set_grad_enabled(not last):
                    loss = loss_fn()
                final = loss.item()
                if step == 0:
                    initial = final
                if last or (self.stop_loss is not None and final < self.stop_loss):
                    break
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                steps_used += 1
        return {
            "case_id": case_id,
            "steps": steps_used,
            "facts": len(facts),
            "initial_loss": initial,
            "final_loss": final,
            "time_s": time.perf_counter() - start,
        }


class CaliNetHandle(PatchEditHandle):
    """One sequence's calibration memory (its slots per layer, hooked) and the edits it was trained on."""

    def __init__(self, patches: PatchHandle) -> None:
        super().__init__(patches, {"time_s": 0.0, "steps": 0, "cases": []})
        #: The calibration memory: one `NeuronPatch` per layer, trained by every edit of the sequence.
        self.slots: dict[int, NeuronPatch] = {}
        self.seen: list[Probe] = []
