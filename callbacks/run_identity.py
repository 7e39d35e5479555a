"""What makes two runs the same run, so that a rerun into a results folder resumes only its own cases.

A results folder holds `run.json` next to `cases.jsonl`: the resolved config without output paths
and run-time settings, the editor and backbone descriptions and a digest of the backbone's weights,
the scoring settings, each annotation file's SHA-256 and how it is read (format, templates, image
root), the sequence length in sequential and lifelong mode (and a lifelong run's checkpoints and
gaps), and the scoring code's version. A rerun resumes only when its identity equals the stored
one; otherwise it stops with one line naming what differs. The case limit is not part of it: a
rerun over a subset (or a superset) of the same data reuses what it can (in lifelong mode the
subset is another sequence, which its length tells apart).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from core.files import file_sha256

#: Bump when a change to scoring makes earlier per-case results incomparable with new ones.
SCORING_VERSION = 1
RUN_FILE = "run.json"
#: Config entries that do not decide a case's numbers: output paths, the config files' own names,
#: the Trainer (devices and strategy give the same numbers; progress bars and loggers none), and how
#: much of the data is read and by how many workers (a subset rerun reuses the cases it shares).
NOT_IDENTITY = (
    "config",
    "results_dir",
    "overwrite",
    "trainer",
    "ckpt_path",
    "data.limit",
    "data.num_workers",
)


def _without(config: dict[str, Any], dropped: tuple[str, ...]) -> dict[str, Any]:
    out = dict(config)
    for path in dropped:
        head, _, rest = path.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = _without(out[head], (rest,))
        elif not rest:
            out.pop(head, None)
    return out


class RunMismatchError(ValueError):
    """A results folder holds results of another run (another editor, backbone, data or settings)."""


def run_identity(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """The identity of the run `trainer` is about to test with `module` (JSON-serialisable)."""
    hparams = module.hparams
    datamodule = trainer.datamodule
    datasets = []
    if datamodule is not None:
        for part in datamodule.describe().get("datasets", []):
            keep = ("file", "image_root", "format", "port_style", "prompt_template", "loc_image_template")
            entry = {k: part.get(k) for k in keep}
            entry["sha256"] = file_sha256(part["file"]) if Path(str(part["file"])).is_file() else None
            datasets.append(entry)
    identity: dict[str, Any] = {
        "scoring_version": SCORING_VERSION,
        "editor": module.editor.describe(),
        "backbone": module.backbone.describe(),
        "backbone_weights": module.backbone.weights_digest(),
        "protocol": hparams.protocol,
        "mode": hparams.mode,
        "generation": hparams.generation,
        "max_hops": hparams.max_hops,
        "datasets": datasets,
        # The resolved config, when the run came through `edit.py` (what the descriptions above miss:
        # the seed, generation length, any option an editor does not describe).
        "config": _without(getattr(module, "run_config", {}) or {}, NOT_IDENTITY),
    }
    if hparams.mode == "sequential" and datamodule is not None:
        # Which cases form one sequence follows from the batch size.
        identity["sequence_length"] = datamodule.hparams.batch_size
    if hparams.mode == "lifelong":
        # The sequence is every case in order: a rerun over fewer (data.limit) is another sequence,
        # and other checkpoints or gaps score other things.
        identity["lifelong"] = asdict(module.settings.lifelong)
        if datamodule is not None:
            identity["sequence_length"] = len(datamodule.case_ids())
    # Through JSON once, so that tuples and lists (and other JSON-equal values) compare equal.
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def identity_diff(stored: Any, current: Any, path: str = "") -> list[str]:
    """The dotted paths at which two identities differ, with both values for the leaves."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored or key not in current:
                out.append(f"{sub} (only in {'the folder' if key in stored else 'this run'})")
            else:
                out += identity_diff(stored[key], current[key], sub)
        return out
    if isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        return [
            d
            for i, (a, b) in enumerate(zip(stored, current, strict=True))
            for d in identity_diff(a, b, f"{path}[{i}]")
        ]
    if stored != current:
        return [f"{path or 'identity'} ({_short(stored)} in the folder, {_short(current)} now)"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def read_identity(folder: Path) -> dict[str, Any] | None:
    path = folder / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunMismatchError(
            f"results_dir {str(folder)!r}: {RUN_FILE} is unreadable ({exc}); choose a new --results_dir, "
            "or rerun with --overwrite true to replace the results there"
        ) from exc


def check_same_run(
    folder: Path, stored: dict[str, Any] | None, current: dict[str, Any], has_results: bool
) -> None:
    """Raise `RunMismatchError` unless the folder is empty or holds results of this very run."""
    if stored is None:
        if has_results:
            raise RunMismatchError(
                f"results_dir {str(folder)!r} holds results without a {RUN_FILE} (written by an older version or "
                "by hand), so it is unknown which run they belong to; choose a new --results_dir, or rerun with "
                "--overwrite true to replace them"
            )
        return
    differ = identity_diff(stored, current)
    if differ:
        shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise RunMismatchError(
            f"results_dir {str(folder)!r} holds results of another run (differs in {shown}); choose a new "
            "--results_dir, or rerun with --overwrite true to replace them"
        )
