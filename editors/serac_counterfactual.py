"""SERAC's counterfactual model: a trained VLM that answers an in-scope probe with the matched edit in context.

In the paper the counterfactual model is a separate, usually smaller, language model fine-tuned to
answer `edit || input`. Here it is a copy of the backbone's own architecture (the same adapter, so
it reads pictures exactly as the backbone does), optionally cut to its first `layers` language
layers, whose weights are the editor's parameters: they are trained with the editor and saved in
the editor checkpoint. Starting from the backbone's weights matters on small models: a VLM that has
already learned to read an in-context "New Fact" only has to learn to trust it.

The matched edit is shown as one in-context item with its own picture (`ContextFormat`), so a probe
about another rendering of the edited thing (I-Gen) sees both pictures. `CounterfactualAnswerer`
puts that context in front of each probe and asks the copy, teacher-forced or greedy, behind the
same interface as a backbone, so `RoutedAnswerer` can send it the in-scope probes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from backbones.base import VLM
from backbones.batching import ProbeBatch, TeacherForced
from core.case import ContextItem, Probe


@dataclass(frozen=True)
class ContextFormat:
    """How the matched edit is put in front of a probe (IKE's and the world backbone's layout by default).

    Args:
        fact_format: the edit as a context line; fields `{prompt}` and `{target}`.
        query_format: the probe's own prompt after the context; field `{prompt}`.
        fact_image: the context line carries the edit's picture.
    """

    fact_format: str = "New Fact: {prompt} {target}"
    query_format: str = "Prompt: {prompt}"
    fact_image: bool = True

    def __post_init__(self) -> None:
        for name, fmt, fields in (
            ("fact_format", self.fact_format, ("{prompt}", "{target}")),
            ("query_format", self.query_format, ("{prompt}",)),
        ):
            missing = [f for f in fields if f not in fmt]
            if missing:
                raise ValueError(f"SERAC {name} {fmt!r} lacks the field(s) {', '.join(missing)}")

    def fact(self, edit: Probe) -> ContextItem:
        text = self.fact_format.format(prompt=edit.prompt, target=edit.answer)
        return ContextItem(text, edit.image if self.fact_image else None)

    def ask(self, probe: Probe, fact: ContextItem) -> Probe:
        """The probe as the counterfactual model is asked it: the fact first, then the formatted question."""
        return replace(probe, prompt=self.query_format.format(prompt=probe.prompt)).with_context((fact,))


def build_counterfactual(vlm: VLM, trainable: Sequence[str], layers: int | None = None) -> VLM:
    """A copy of `vlm` (adapter, tokenizer, processor, weights) whose `trainable` groups require grad.

    `layers` keeps only the first N language layers (a smaller counterfactual model, as the paper's);
    None keeps them all. The copy stays in eval mode: it must answer in training as it will in tests.
    """
    cf = copy.deepcopy(vlm)
    if layers is not None:
        _keep_first_layers(cf, layers)
    cf.requires_grad_(False)
    params = cf.parameter_group(*trainable) if trainable else {}
    for p in params.values():
        p.requires_grad_(True)
    cf.model.eval()
    cf.generation_counts = {"read_off_teacher_forced": 0, "decoded": 0}
    return cf


def _keep_first_layers(cf: VLM, n: int) -> None:
    layers = cf.language_layers()
    if not 1 <= n <= len(layers):
        raise ValueError(f"SERAC cf_layers must be in [1, {len(layers)}] for this backbone, got {n}")
    del layers[n:]
    config = cf.text_config()
    config.num_hidden_layers = n
    # Configs that list a type per layer (sliding / full attention) must list only the kept ones.
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:n])


class CounterfactualAnswerer:
    """Answers probes with the counterfactual model, each with its matched edit in context.

    Args:
        model: the counterfactual VLM.
        fact_of: the context item of the memory entry a probe was matched to.
        fmt: how fact and question are laid out.
    """

    def __init__(self, model: VLM, fact_of: Callable[[Probe], ContextItem], fmt: ContextFormat) -> None:
        self.model = model
        self.fact_of = fact_of
        self.fmt = fmt

    def _asked(self, probes: Sequence[Probe]) -> list[Probe]:
        return [self.fmt.ask(p, self.fact_of(p)) for p in probes]

    def teacher_forced(self, probes: Sequence[Probe], all_topk: int = 0) -> list[TeacherForced]:
        return self.model.teacher_forced(self._asked(probes), all_topk)

    def generate(
        self, probes: Sequence[Probe], teacher_forced: Sequence[TeacherForced] | None = None
    ) -> list[str]:
        # The teacher-forced outputs came from the same asked rows, so greedy answers can be read off them.
        return self.model.generate(self._asked(probes), teacher_forced=teacher_forced)


def answer_log_probs(logits: torch.Tensor, batch: ProbeBatch) -> list[torch.Tensor]:
    """Each row's log-probabilities at the positions that predict its answer tokens: (n_answer, V)."""
    out = []
    for i, (s, e) in enumerate(batch.answer_spans):
        out.append(logits[i, s - 1 : e - 1].float().log_softmax(-1))
    return out


def kl_to_reference(model: VLM, rows: Sequence[Probe], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions at the answer positions of `rows`.

    `reference[i]` holds the unedited backbone's log-probabilities at row i's answer positions
    (asked without context); the answer tokens are the same, so the positions line up one to one.
    """
    batch = model.build_batch(rows)
    current = answer_log_probs(model.logits(batch), batch)
    terms = []
    for log_q, log_p in zip(current, reference, strict=True):
        log_p = log_p.to(log_q.device)
        terms.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(terms).mean()
