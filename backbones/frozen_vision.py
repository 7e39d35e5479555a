"""Run frozen modules once per edit, not once per optimisation step (the vision tower under FT (Vis)).

FT (Vis) trains the projector (or BLIP-2's Q-Former): the vision tower below it is frozen and sees
the same pixels at every step, so it computes the same features every time. While
`reuse_frozen_outputs` is active, each frozen module (a module whose parameters all have
`requires_grad` off; inside a partly trained module, its frozen children) hands back its previous
output when it is called again with equal inputs: tensors of the same shape, dtype and device and
equal values (`torch.equal`; families reshape or concatenate pixels per call, so identity would
rarely hold), and equal other arguments. The previous output is handed back in a fresh container
(BLIP-2 writes its projected features into the vision output it got) and only while no one has
modified its tensors in place. Anything else runs the module as usual.

`FineTune` also watches the layers it replays (`backbones/frozen_prefix.py`): when only the last
layer's MLP trains, that layer's attention and norms get the same inputs at every step as well.

Same module, same frozen weights, same input values: the reused output is the one the module would
compute again, so losses and edited weights are unchanged bit for bit (tested per family). Comparing
the pixels costs one pass over them, far less than the tower.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def frozen_roots(members: Iterable[nn.Module | nn.Parameter]) -> list[nn.Module]:
    """The largest frozen modules among `members` and their descendants (bare parameters are skipped)."""
    roots: list[nn.Module] = []
    for member in members:
        if not isinstance(member, nn.Module):
            continue
        if not any(p.requires_grad for p in member.parameters()):
            # A container is never called itself: its children are.
            roots.extend(member.children() if isinstance(member, nn.ModuleList | nn.ModuleDict) else [member])
        else:
            roots.extend(frozen_roots(member.children()))
    return roots


@contextlib.contextmanager
def reuse_frozen_outputs(members: Iterable[nn.Module | nn.Parameter]) -> Iterator[list[FrozenOutputMemo]]:
    """While active, frozen modules among `members` return their last output for identical inputs.

    Yields one memo per watched module (`.module`, `.hits`: calls answered from the previous
    output). Which modules are frozen is decided on entry: train nothing inside them within the block.
    """
    memos = [FrozenOutputMemo(module) for module in frozen_roots(members)]
    try:
        yield memos
    finally:
        for memo in memos:
            memo.remove()


class FrozenOutputMemo:
    """Replaces one module's `forward` (an instance attribute, so hooks and `__call__` still run)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.had_own_forward = "forward" in module.__dict__
        self.forward = module.forward
        self.inputs: tuple[Any, Any] | None = None
        self.input_versions: list[int] = []
        self.output: Any = None
        self.output_versions: list[int] = []
        self.hits = 0
        module.forward = self  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.had_own_forward:
            self.module.forward = self.forward  # type: ignore[method-assign]
        else:
            del self.module.forward
        self.inputs = self.output = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (
            self.inputs is not None
            # The kept inputs unchanged since (else the comparison below would be against new values).
            and _versions(self.inputs) == self.input_versions
            and _versions(self.output) == self.output_versions
            and _same(self.inputs, (args, kwargs))
        ):
            self.hits += 1
            return _fresh_container(self.output)
        output = self.forward(*args, **kwargs)
        self.inputs = (args, kwargs)
        self.input_versions = _versions(self.inputs)
        # The kept container is never handed out, so a caller writing into its own cannot change it.
        self.output, self.output_versions = _fresh_container(output), _versions(output)
        return output


def _fresh_container(value: Any) -> Any:
    """A shallow copy of a dict (ModelOutput) or list output; tensors and tuples as they are.

    A tensor is never copied: a copy would share its storage but not its version counter, which is
    what detects in-place changes.
    """
    if isinstance(value, dict | list):
        return copy.copy(value)
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # ModelOutput is a dict too
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _versions(value: Any) -> list[int]:
    return [t._version for t in _tensors(value)]


def _same(a: Any, b: Any) -> bool:
    """Equal tensors (values, shape, dtype, device) and equal everything else, recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and a.requires_grad == b.requires_grad
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a plain truth value
        return a is b
