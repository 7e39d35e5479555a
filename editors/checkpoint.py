"""Editor checkpoints: safetensors files that know which backbone (and editor) they were trained for.

Trainable editors (MEND, KE, SERAC, UniKE encoders) save their weights with
`save_editor_checkpoint` and load them with `load_editor_checkpoint`. The file is safetensors, so
loading never unpickles anything. Its metadata holds the editor class and the backbone's
`VLM.fingerprint()` (model class, hidden size, layer count, vocabulary size, and the names and shapes
of the parameters the editor attaches to). Loading compares that fingerprint with the backbone at
hand and checks every tensor for NaN/Inf, so a checkpoint trained for another model, or one whose
training diverged, fails at load time with a message that names what is wrong, instead of producing
shape errors or meaningless scores an hour into an evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

#: The safetensors metadata key holding the JSON-encoded editor/backbone description.
META_KEY = "mmke_editor_meta"
FORMAT_VERSION = 1


class EditorCheckpointError(ValueError):
    """An editor checkpoint that cannot be used: unreadable, for another backbone, or non-finite."""


def save_editor_checkpoint(
    path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write `state_dict` and `meta` as one safetensors file.

    `meta` must hold `editor` (the editor's class name) and `backbone` (`vlm.fingerprint(...)` of the
    backbone it was trained on); anything else JSON-serialisable (training config, step) may ride
    along. Non-finite tensors are refused here too, so a diverged run cannot leave a checkpoint behind.
    """
    for key in ("editor", "backbone"):
        if key not in meta:
            raise ValueError(f"editor checkpoint meta needs {key!r}; got keys {sorted(meta)}")
    _check_finite(Path(path), state_dict)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage or are not contiguous; a state dict from
    # module.state_dict() can hold both (tied weights, transposed views).
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in state_dict.items()}
    payload = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    save_file(tensors, str(path), metadata={META_KEY: payload})
    return path


def load_editor_checkpoint(
    path: str | os.PathLike[str], expected_backbone: dict[str, Any], editor: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an editor checkpoint for the backbone described by `expected_backbone`.

    Args:
        path: a safetensors file written by `save_editor_checkpoint`.
        expected_backbone: `vlm.fingerprint(...)` of the backbone about to be edited, with the same
            parameter groups the editor used when it saved.
        editor: the loading editor's class name; when given, a checkpoint of another editor is refused.

    Returns:
        (state_dict, meta). Raises `EditorCheckpointError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise EditorCheckpointError(f"editor checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EditorCheckpointError(
            f"editor checkpoint {path} is not a readable safetensors file ({exc}); editor checkpoints are "
            "safetensors only, pickled .pt/.ckpt files are not loaded"
        ) from exc
    raw = metadata.get(META_KEY)
    if raw is None:
        raise EditorCheckpointError(
            f"editor checkpoint {path} has no {META_KEY!r} metadata; it was not written by "
            "save_editor_checkpoint, so the backbone it was trained for is unknown"
        )
    meta = json.loads(raw)
    if editor is not None and meta.get("editor") != editor:
        raise EditorCheckpointError(
            f"editor checkpoint {path} was saved by editor {meta.get('editor')!r}, not {editor!r}"
        )
    stored = meta.get("backbone", {})
    differ = fingerprint_diff(stored, expected_backbone)
    if differ:
        raise EditorCheckpointError(
            f"editor checkpoint {path} was trained for another backbone (differs in {', '.join(differ)}): "
            f"checkpoint backbone {_short(stored)}, current backbone {_short(expected_backbone)}"
        )
    _check_finite(path, tensors)
    return tensors, meta


def fingerprint_diff(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Keys (and parameter names) on which two backbone fingerprints disagree."""
    differ = [
        k
        for k in sorted(set(stored) | set(expected))
        if k != "parameters" and stored.get(k) != expected.get(k)
    ]
    params_a, params_b = stored.get("parameters", {}), expected.get("parameters", {})
    for name in sorted(set(params_a) | set(params_b)):
        if params_a.get(name) != params_b.get(name):
            differ.append(f"parameter {name} ({params_a.get(name)} vs {params_b.get(name)})")
    return differ


def _short(fingerprint: dict[str, Any]) -> str:
    # The parameter table can be long; the scalar fields and the parameter count identify a backbone.
    scalars = {k: v for k, v in fingerprint.items() if k != "parameters"}
    return json.dumps({**scalars, "n_parameters": len(fingerprint.get("parameters", {}))}, sort_keys=True)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            n_nan = int(torch.isnan(tensor).sum())
            raise EditorCheckpointError(
                f"editor checkpoint {path}: tensor {name!r} holds {n_nan} NaN and {int(bad.sum()) - n_nan} "
                f"Inf values out of {tensor.numel()}; the training run that wrote it diverged"
            )
