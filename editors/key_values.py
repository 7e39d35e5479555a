"""Keys and target values of locate-then-edit methods: read k at a fact's key position, optimise v*.

ROME, MEMIT and AlphaEdit see one FFN value projection `W` (`vlm.ffn_ports(l).value_linear`) as a
key-value memory: its input at a fact's key position is the key k, its output the value v. Writing a
fact means finding the value v* that makes the model give the new answer, then changing W so that
W k* gives v*. This module does the two model-facing halves:

- `read_at_positions`: one forward, capturing at each fact's key position the keys (value-projection
  inputs) of some layers and the outputs of some modules;
- `optimise_targets`: v* (ROME: at the edited layer's FFN output) or z (MEMIT: at the last edited
  layer's output), one free vector per fact added at its key position and optimised with Adam on
  the new answer's NLL, plus ROME's essence term (a KL on an "essence" probe of the same subject, so
  the subject does not turn into something else) and a weight decay on ||delta|| / ||v||^2, with
  ||delta|| clamped to `clamp_norm` * ||v||. All facts go in one batch with a vector each: every
  fact's loss depends only on its own vector and Adam is elementwise, so this equals optimising
  them one by one.

The references optimise over their prompt and ten model-generated prefixes ("context templates");
here a fact is optimised on its edit probe (image, question, answer) as given, which is what every
probe of the benchmarks asks it with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backbones.base import KEY_POSITIONS, VLM
from backbones.batching import IGNORE_INDEX
from backbones.frozen_vision import reuse_frozen_outputs
from core.case import Probe


@dataclass(frozen=True)
class KeySpec:
    """Where a fact's key is read (`VLM.key_positions`): position kind, and the span text for "span"."""

    position: str = "image"
    span: str | None = None

    def problems(self) -> list[str]:
        if self.position not in KEY_POSITIONS:
            return [f"position must be one of {list(KEY_POSITIONS)}, got {self.position!r}"]
        if self.position == "span" and not self.span:
            return ['position "span" needs span (the text whose last token holds the key)']
        return []


@dataclass(frozen=True)
class TargetSettings:
    """How v* (or z) is optimised; the references' names in brackets, ROME's GPT-2 XL values as defaults.

    steps [v_num_grad_steps], lr [v_lr] (Adam), weight_decay [v_weight_decay] on ||delta|| / ||v||^2,
    clamp_norm [clamp_norm_factor]: ||delta|| <= clamp_norm * ||v||, kl_factor: weight of the essence
    KL, essence_prompt: the essence probe's question ("{}" is replaced by the span text, or "This"),
    stop_loss: stop once every fact's loss is below it.
    """

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    kl_factor: float = 0.0625
    essence_prompt: str = "{} is a"
    stop_loss: float = 5e-2

    def problems(self) -> list[str]:
        out = []
        if self.steps < 0:
            out.append(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            out.append(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "kl_factor", "stop_loss"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.clamp_norm > 0:
            out.append(f"clamp_norm must be > 0, got {self.clamp_norm}")
        if self.essence_prompt.count("{}") > 1:
            out.append(f"essence_prompt may hold one '{{}}', got {self.essence_prompt!r}")
        return out


def _at_rows(output: object, shape: torch.Size) -> Tensor:
    """A module's (first) output as [batch, seq, width] (OPT's FFN works on flattened rows)."""
    tensor = output[0] if isinstance(output, tuple) else output
    return tensor.reshape(*shape, -1)


@contextlib.contextmanager
def _add_at(
    module: nn.Module, shape: torch.Size, rows: Tensor, cols: Tensor, delta: Tensor
) -> Iterator[None]:
    """Add delta[i] to `module`'s output at (rows[i], cols[i]) in every forward inside the block."""

    def hook(_m, _args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        flat = tensor.reshape(*shape, -1)
        add = torch.zeros_like(flat).index_put((rows, cols), delta.to(flat.dtype))
        new = (flat + add).reshape(tensor.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def read_at_positions(
    vlm: VLM,
    probes: Sequence[Probe],
    key: KeySpec,
    key_layers: Sequence[int],
    out_modules: Sequence[nn.Module],
) -> tuple[dict[int, Tensor], list[Tensor]]:
    """One forward over `probes`: keys of `key_layers` and outputs of `out_modules` at each probe's key position.

    Returns {layer: [n, d_key]} and one [n, width] tensor per module, in float32 on the model's device.
    """
    batch = vlm.build_batch(probes)
    shape = batch.inputs["input_ids"].shape
    rows = torch.arange(len(probes), device=vlm.device)
    cols = torch.tensor(vlm.key_positions(probes, batch, key.position, key.span), device=vlm.device)
    keys: dict[int, Tensor] = {}
    outs: list[Tensor | None] = [None] * len(out_modules)
    handles = []
    for layer in key_layers:

        def pre(_m, args, layer=layer):
            keys[layer] = args[0].reshape(*shape, -1)[rows, cols].float()

        handles.append(vlm.ffn_ports(layer).value_linear.register_forward_pre_hook(pre))
    for i, module in enumerate(out_modules):

        def post(_m, _args, output, i=i):
            outs[i] = _at_rows(output, shape)[rows, cols].float()

        handles.append(module.register_forward_hook(post))
    try:
        vlm.model(**batch.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return keys, outs  # type: ignore[return-value]


def essence_probes(facts: Sequence[Probe], key: KeySpec, prompt: str) -> list[Probe]:
    """ROME's "{subject} is a" probes: each fact's image with the essence prompt (answer unused)."""
    text = prompt.format(key.span if key.position == "span" else "This") if "{}" in prompt else prompt
    return [Probe(text, fact.answer, fact.image, kind="essence") for fact in facts]


def optimise_targets(
    vlm: VLM, facts: Sequence[Probe], key: KeySpec, module: nn.Module, settings: TargetSettings
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Optimise one vector per fact added to `module`'s output at the fact's key position.

    Returns (init, delta, stats): init [n, width] the module's output there before the edit, delta
    [n, width] the optimised shift (the target is init + delta, float32).
    """
    n = len(facts)
    with_kl = settings.kl_factor > 0
    probes = list(facts) + (essence_probes(facts, key, settings.essence_prompt) if with_kl else [])
    batch = vlm.build_batch(probes)
    shape = batch.inputs["input_ids"].shape
    device = vlm.device
    rows = torch.arange(len(probes), device=device)
    cols = torch.tensor(vlm.key_positions(probes, batch, key.position, key.span), device=device)
    labels = batch.labels.clone()
    labels[n:] = IGNORE_INDEX  # the essence rows are only read for the KL
    _, (init,) = read_at_positions(vlm, facts, key, [], [module])
    init = init.detach()
    width = init.shape[-1]
    delta = torch.zeros(n, width, device=device, requires_grad=True)
    optim = torch.optim.Adam([delta], lr=settings.lr)
    max_norm = settings.clamp_norm * init.norm(dim=-1)
    fact_index = torch.arange(len(probes), device=device) % n
    kl_init: Tensor | None = None
    stats = {"initial_nll": float("nan"), "final_nll": float("nan"), "steps": 0}
    with reuse_frozen_outputs(vlm.vision_modules() + vlm.projector_modules()):
        for step in range(settings.steps + 1):
            with _add_at(module, shape, rows, cols, delta[fact_index]):
                logits = vlm.logits(batch, use_cache=False)
            nll = _row_nll(logits[:n], labels[:n])
            loss = nll.clone()
            if with_kl:
                log_probs = torch.log_softmax(logits[rows[n:], cols[n:]].float(), -1)
                if kl_init is None:
                    kl_init = log_probs.detach()
                # ROME's direction: KL(edited || unedited) at the essence probe's key position.
                kl = (log_probs.exp() * (log_probs - kl_init)).sum(-1)
                loss = loss + settings.kl_factor * kl
            decay = settings.weight_decay * delta.norm(dim=-1) / init.norm(dim=-1).clamp_min(1e-12) ** 2
            loss = loss + decay
            if step == 0:
                stats["initial_nll"] = float(nll.detach().mean())
            stats["final_nll"] = float(nll.detach().mean())
            if step == settings.steps or bool((loss < settings.stop_loss).all()):
                break
            optim.zero_grad(set_to_none=True)
            loss.sum().backward()
            optim.step()
            stats["steps"] += 1
            with torch.no_grad():
                norms = delta.norm(dim=-1)
                scale = torch.where(
                    norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms)
                )
                delta.mul_(scale.unsqueeze(-1))
    return init, delta.detach(), stats


def _row_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's mean NLL of its labelled tokens (logit t predicts token t + 1)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = log_probs.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(-1) / mask.sum(-1).clamp_min(1)
