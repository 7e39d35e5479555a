"""KN: edit a fact through its knowledge neurons (Dai et al., ACL 2022, "Knowledge Neurons in
Pretrained Transformers").

For each fact of an edit, and each answer token the model gets wrong (teacher-forced: the model's
argmax `old` at that position differs from the new answer's token `new`), the neurons that express
`old` are found by integrated gradients over the FFN's hidden activations at that position
(`editors/kn_attribution.py`: 20-step Riemann sum, coarse neurons above 0.2 x the largest
attribution, refined across the fact's prompts), and each one's value vector - its column of the
FFN's value projection, `FfnPorts.value_linear` - is moved from the old answer to the new one:

    v_i <- v_i + sign(a_i) * (add_scale * e(new) - erase_scale * e(old))

e(t) is token t's row of the output embedding (the direction the logit of t reads off the residual
stream; BERT, the paper's model, ties it to the input embedding the reference code uses), and the
reference code's scales are 2 and 2. sign(a_i), the neuron's activation on the edit, is one
addition to the reference: GELU neurons that fire strongly are positive, but SwiGLU units
(Llama, Qwen) fire with either sign, and a negative activation would write the opposite of the
edit. Weights change in place; `restore()` copies the touched value projections back.

The prompts of a fact are its edit probes only (the image and question it is edited with): the
rephrasings a benchmark holds are its T-Gen probes, which an editor must not see, so with one
prompt refinement keeps the coarse set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from backbones.base import VLM
from core.case import EditCase, Probe
from editors.base import Editor, ParameterSnapshot, WeightEditHandle
from editors.kn_attribution import (
    Neuron,
    coarse_neurons,
    ffn_activations,
    integrated_gradients,
    refine_neurons,
)


class KnowledgeNeurons(Editor):
    """KN: per wrong answer token, find the old answer's knowledge neurons and rewrite their value vectors.

    Args:
        layers: language layers searched (negative counts from the last; None: every layer, as the paper).
        steps: Riemann steps of the integrated gradients (reference 20).
        threshold: coarse neurons have attribution > threshold x the prompt's largest (reference 0.2).
        share: refinement keeps neurons found for at least this share of a fact's prompts.
        max_neurons: keep at most this many neurons per answer token, the largest attributions first
            (None: every refined neuron).
        add_scale: weight of the new answer's embedding added to each value vector (reference 2).
        erase_scale: weight of the old answer's embedding subtracted (reference 2).
        name: recorded in results.
    """

    side_by_side = False

    def __init__(
        self,
        layers: list[int] | None = None,
        steps: int = 20,
        threshold: float = 0.2,
        share: float = 0.5,
        max_neurons: int | None = None,
        add_scale: float = 2.0,
        erase_scale: float = 2.0,
        name: str = "kn",
    ) -> None:
        problems = []
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            problems.append(f"layers must be None or distinct layer indices, got {layers}")
        if steps < 1:
            problems.append(f"steps must be >= 1, got {steps}")
        if not 0 <= threshold < 1:
            problems.append(f"threshold must be in [0, 1), got {threshold}")
        if not 0 < share <= 1:
            problems.append(f"share must be in (0, 1], got {share}")
        if max_neurons is not None and max_neurons < 1:
            problems.append(f"max_neurons must be >= 1 or None, got {max_neurons}")
        if add_scale < 0 or erase_scale < 0:
            problems.append(f"add_scale and erase_scale must be >= 0, got {add_scale}, {erase_scale}")
        if problems:
            raise ValueError("KnowledgeNeurons: " + "; ".join(problems))
        self.layers = None if layers is None else list(layers)
        self.steps = steps
        self.threshold = threshold
        self.share = share
        self.max_neurons = max_neurons
        self.add_scale = add_scale
        self.erase_scale = erase_scale
        self.name = name

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "layers": self.layers,
            "steps": self.steps,
            "threshold": self.threshold,
            "share": self.share,
            "max_neurons": self.max_neurons,
            "add_scale": self.add_scale,
            "erase_scale": self.erase_scale,
        }

    def layer_indices(self, vlm: VLM) -> list[int]:
        n = vlm.num_language_layers
        if self.layers is None:
            return list(range(n))
        bad = [layer for layer in self.layers if not -n <= layer < n]
        if bad:
            raise ValueError(
                f"KnowledgeNeurons: layers {bad} do not exist; the language model has {n} layers"
            )
        indices = sorted({layer % n for layer in self.layers})
        if len(indices) != len(self.layers):
            raise ValueError(f"KnowledgeNeurons: layers {self.layers} name the same layer twice")
        return indices

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> WeightEditHandle:
        layers = self.layer_indices(vlm)
        weights = {id(vlm.ffn_ports(layer).value_linear.weight) for layer in layers}
        params = {name: p for name, p in vlm.model.named_parameters() if id(p) in weights}
        start = time.perf_counter()
        per_case = []
        with torch.inference_mode(False):
            snapshot = ParameterSnapshot(params)
            try:
                for case in cases:
                    found = [self._edit_fact(vlm, fact, layers) for fact in case.edits]
                    per_case.append({"case_id": case.case_id, "neurons": sum(found), "facts": len(found)})
            except BaseException:
                # No handle reaches the caller when an edit fails: undo the half-written edit here.
                snapshot.restore()
                raise
        stats: dict[str, object] = {
            "time_s": time.perf_counter() - start,
            "neurons": sum(int(c["neurons"]) for c in per_case),
            "cases": per_case,
        }
        return WeightEditHandle(snapshot, stats=stats)

    def _edit_fact(self, vlm: VLM, fact: Probe, layers: list[int]) -> int:
        """Rewrite the knowledge neurons of each wrongly predicted answer token of `fact`; returns how many."""
        batch = vlm.build_batch([fact])
        start, end = batch.answer_spans[0]
        with torch.no_grad():
            logits = vlm.model(**batch.inputs, use_cache=False).logits[0]
        activations = ffn_activations(vlm, batch, layers)
        embeddings = vlm.lm_head().weight
        edited = 0
        for t in range(start, end):
            position = t - 1  # the logit at t - 1 predicts the token at t
            old = int(logits[position].argmax())
            new = int(batch.inputs["input_ids"][0, t])
            if old == new:
                continue
            neurons = self.neurons(vlm, [(fact, position)], old, layers)
            with torch.no_grad():
                delta = self.add_scale * embeddings[new] - self.erase_scale * embeddings[old]
                for layer, unit in neurons:
                    sign = 1.0 if float(activations[layer][0, position, unit]) >= 0 else -1.0
                    weight = vlm.ffn_ports(layer).value_linear.weight
                    weight[:, unit] += (sign * delta).to(weight.dtype)
            edited += len(neurons)
        return edited

    def neurons(
        self, vlm: VLM, views: Sequence[tuple[Probe, int]], token: int, layers: list[int]
    ) -> list[Neuron]:
        """The knowledge neurons of `token` refined over `views` (prompt, position), largest attribution first."""
        per_prompt: list[set[Neuron]] = []
        total: dict[int, torch.Tensor] = {}
        for prompt, position in views:
            attributions = integrated_gradients(vlm, prompt, position, token, layers, self.steps)
            per_prompt.append(coarse_neurons(attributions, self.threshold))
            for layer, a in attributions.items():
                total[layer] = total[layer] + a if layer in total else a
        refined = refine_neurons(per_prompt, self.share)
        refined.sort(key=lambda n: -float(total[n[0]][n[1]]))
        return refined if self.max_neurons is None else refined[: self.max_neurons]
