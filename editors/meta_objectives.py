"""Meta-training objectives shared by editors that learn to edit (MEND, KE, learned step sizes).

Such an editor computes edited weights as a differentiable function of its own parameters and asks
how the backbone would answer with them, without ever writing them into the model:

- `edit_term(vlm, weights, case)`: the NLL of the case's answers that the edit should produce (the
  edit, its rephrasings and its other images) under the edited weights;
- `locality_term(vlm, weights, case)`: KL(unedited || edited) of the next-token distributions at the
  answer positions of the case's locality probes (text and image).

`weights` maps backbone parameter names (as in `vlm.parameter_group`) to tensors; every other
parameter stays as it is (`VLM.logits_with`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backbones.base import VLM
from backbones.batching import IGNORE_INDEX, answer_nll
from core.case import EditCase, Probe

#: Probe kinds whose answers the edit should produce (the edit term).
EDIT_KINDS: tuple[str, ...] = ("rel", "t_gen", "i_gen")


def unique(probes: Sequence[Probe]) -> list[Probe]:
    """The probes without repeats of the same object (the edit is also the first Rel probe)."""
    return list({id(p): p for p in probes}.values())


def edit_probes(case: EditCase) -> list[Probe]:
    """The edit(s) and every probe whose answer the edit should change (Rel, T-Gen, I-Gen)."""
    return unique([*case.edits, *(p for k in EDIT_KINDS for p in case.probes.get(k, []))])


def post_edit_nll(vlm: VLM, weights: dict[str, torch.Tensor], probes: Sequence[Probe]) -> torch.Tensor:
    """Mean answer NLL of `probes` with `weights` in place of the backbone's (differentiable in them)."""
    batch = vlm.build_batch(probes)
    return answer_nll(vlm.logits_with(batch, weights), batch.labels)


def post_edit_kl(vlm: VLM, weights: dict[str, torch.Tensor], probes: Sequence[Probe]) -> torch.Tensor:
    """KL(unedited || edited) of the next-token distributions at the probes' answer positions."""
    batch = vlm.build_batch(probes)
    with torch.no_grad():
        before = vlm.logits(batch)
    after = vlm.logits_with(batch, weights)
    positions = batch.labels[:, 1:] != IGNORE_INDEX
    log_p = before[:, :-1][positions].float().log_softmax(-1)
    log_q = after[:, :-1][positions].float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def edit_term(vlm: VLM, weights: dict[str, torch.Tensor], case: EditCase) -> torch.Tensor:
    return post_edit_nll(vlm, weights, edit_probes(case))


def locality_term(vlm: VLM, weights: dict[str, torch.Tensor], case: EditCase) -> torch.Tensor | None:
    """None when the case has no locality probe."""
    probes = case.locality_probes()
    return post_edit_kl(vlm, weights, probes) if probes else None
