"""On-disk layout of mined knowledge: `datasets` folders that know which backbone and settings made them.

A knowledge folder (`data/unike/world_llava` for the world backbone) holds:

    .gitignore          `*`: tens of thousands of rendered PNGs and ~150 MB of states never enter git
    images/             renderings drawn for the triplets (world sources only)
    triplets/           `Dataset.save_to_disk`: key, question, image, a_pos, a_neg, source, fact
    triplets/knowledge.json   what made it: the backbone's fingerprint and weights digest, the settings
    states/             `Dataset.save_to_disk`: key, fact, sem_<l>, pos_<l>, neg_<l> (float32 [H] each)
    states/knowledge.json     the backbone, the layers, the triplets it was extracted from

Each folder is written to a temporary sibling and renamed into place, so a killed run never leaves a
half-written dataset that a rerun would take for finished. A rerun whose key (backbone + settings)
matches reuses the folder; another key is refused in one line naming the folder and what differs,
unless the caller asks to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from backbones.base import VLM

#: The JSON file inside a dataset folder that says what made it.
KEY_FILE = "knowledge.json"
TRIPLETS_DIR = "triplets"
STATES_DIR = "states"
IMAGES_DIR = "images"
#: The columns every triplet dataset has (the contract with the states extraction and the editor).
TRIPLET_COLUMNS: tuple[str, ...] = ("key", "question", "image", "a_pos", "a_neg", "source", "fact")
#: Fields of a key file that record what a run produced, not what it was made from: never compared.
OUTCOME_FIELDS = frozenset({"counts", "n", "n_triplets", "seconds"})
#: The kinds of hidden state, in the order of Section 3.3: question end, + true answer, + wrong answer.
STATE_KINDS: tuple[str, ...] = ("sem", "pos", "neg")


class KnowledgeStoreError(ValueError):
    """A knowledge folder that cannot be used: missing, damaged, or made by another backbone or settings."""


class KnowledgeOptionError(KnowledgeStoreError):
    """A mining option that cannot work (no sources, an unknown split, a pool too small)."""


def backbone_key(vlm: VLM) -> dict[str, Any]:
    """What identifies the backbone whose states these are: its fingerprint and a digest of its weights.

    The fingerprint alone (class and sizes) would accept a same-shaped model with other weights, whose
    hidden states mean something else; the digest refuses it.
    """
    return {**vlm.fingerprint(), "weights_digest": vlm.weights_digest()}


def digest(data: Any) -> str:
    """A short, stable hash of a JSON-serialisable value (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_key(folder: Path) -> dict[str, Any] | None:
    """The key a dataset folder was written with, None when the folder holds no finished dataset."""
    path = folder / KEY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KnowledgeStoreError(f"{path} is not valid JSON ({exc}); delete {folder} and rerun") from exc


def key_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Top-level entries (and backbone fields) on which two keys disagree, for a one-line refusal."""
    differ: list[str] = []
    for name in sorted(set(stored) | set(wanted)):
        if name in OUTCOME_FIELDS:
            continue
        a, b = stored.get(name), wanted.get(name)
        if a == b:
            continue
        if name == "backbone" and isinstance(a, dict) and isinstance(b, dict):
            differ += [f"backbone {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            differ.append(name)
    return differ


def check_reusable(folder: Path, wanted: dict[str, Any], what: str, overwrite: bool) -> bool:
    """True when `folder` already holds `what` made with the `wanted` key (reuse it).

    False when there is nothing (or `overwrite` and something else is there: it is removed). Another
    key without `overwrite` is refused, naming the folder and what differs.
    """
    stored = read_key(folder)
    if stored is None:
        return False
    differ = key_differences(stored, wanted)
    if not differ:
        return True
    if overwrite:
        shutil.rmtree(folder)
        return False
    raise KnowledgeStoreError(
        f"{folder} holds {what} made with other inputs (differs in {', '.join(differ)}); "
        "pass --overwrite true to replace it, or choose another --out"
    )


def save_dataset(folder: Path, dataset: datasets.Dataset, key: dict[str, Any]) -> None:
    """Write `dataset` and its key to `folder` through a temporary sibling (atomic for a rerun)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))
    # The key goes last: a folder without it is unfinished (read_key returns None).
    (tmp / KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def resolve_folder(path: str | Path, sub: str) -> Path:
    """`path` itself when it is the dataset folder, else `path/sub` (a knowledge folder was given)."""
    path = Path(path)
    return path / sub if (path / sub).is_dir() and not (path / KEY_FILE).is_file() else path


def load_checked(
    path: str | Path, sub: str, columns: Sequence[str], what: str
) -> tuple[datasets.Dataset, dict[str, Any], Path]:
    """Load the `what` dataset at `path` (or `path/sub`), its key and its folder; refuse a missing or damaged one.

    Every refusal is one line naming the folder: not there, not a finished dataset, not readable, or
    without one of `columns`.
    """
    folder = resolve_folder(path, sub)
    if not folder.is_dir():
        raise KnowledgeStoreError(
            f"{what} folder {folder} does not exist: run python -m knowledge.mine --config <config> first"
        )
    key = read_key(folder)
    if key is None:
        raise KnowledgeStoreError(
            f"{folder} holds no finished {what} (no {KEY_FILE}): it was not written by knowledge.mine, "
            "or its run was killed; rerun python -m knowledge.mine"
        )
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise KnowledgeStoreError(f"{folder} is not a readable `datasets` folder ({exc})") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise KnowledgeStoreError(f"{folder} holds a {type(dataset).__name__}, not one Dataset of {what}")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KnowledgeStoreError(
            f"{folder}: {what} lack column(s) {missing} (columns: {dataset.column_names})"
        )
    return dataset, key, folder


def ignore_in_git(out: Path) -> None:
    """Keep a knowledge folder out of git: it is derived data, rebuilt by one command."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / ".gitignore"
    if not marker.exists():
        marker.write_text(
            "# Written by knowledge.mine: derived data (python -m knowledge.mine rebuilds it).\n*\n"
        )
