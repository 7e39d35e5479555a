"""Extract the states of a whole mined triplet dataset, in chunks, into `datasets` columns.

What `python -m knowledge.mine` runs after mining (`--stage states` alone). The states themselves
(`h_sem`, `h_pos`, `h_neg` at the pre-attention point) are `knowledge.states.extract_states`; this module
only feeds it the triplets with their pictures and lays the result out as fixed-size float32 columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from backbones.base import VLM
from core.case import Probe
from datamodules.images import ImageLoader, ImageLoadError
from knowledge.states import extract_states, state_column
from knowledge.store import STATE_KINDS, KnowledgeStoreError


def load_image(path: str) -> Image.Image:
    """A triplet's picture as RGB, through the lab's image loader (format whitelist, bomb guard)."""
    p = Path(path)
    return ImageLoader(p.parent).load(p.name)


def extract_triplet_states(
    vlm: VLM,
    triplets: datasets.Dataset,
    layers: Sequence[int],
    chunk_size: int = 2048,
    progress: bool = True,
    image_loader: Callable[[str], Image.Image] = load_image,
) -> dict[str, np.ndarray]:
    """The states of every triplet, as columns `{"sem_-1": [N, H] float32, ...}` in triplet order.

    Triplets are read `chunk_size` at a time (a progress step each); pictures shared by several
    triplets of a chunk (one rendering asked in three wordings) are decoded once.
    """
    n = len(triplets)
    hidden = vlm.fingerprint()["hidden_size"]
    columns = {
        state_column(kind, layer): np.zeros((n, hidden), dtype=np.float32)
        for kind in STATE_KINDS
        for layer in layers
    }
    bar = tqdm(total=n, desc="states", unit="triplet", disable=not progress)
    for start in range(0, n, chunk_size):
        rows = triplets[start : start + chunk_size]
        images: dict[str, Image.Image] = {}
        questions = []
        for question, image in zip(rows["question"], rows["image"], strict=True):
            if image and image not in images:
                try:
                    images[image] = image_loader(image)
                except ImageLoadError as exc:
                    raise KnowledgeStoreError(f"triplet image: {exc}") from exc
            questions.append(Probe(question, "", images[image] if image else None))
        states = extract_states(vlm, questions, rows["a_pos"], rows["a_neg"], layers)
        for kind in STATE_KINDS:
            for layer in layers:
                columns[state_column(kind, layer)][start : start + len(questions)] = states[kind][
                    layer
                ].numpy()
        bar.update(len(questions))
    bar.close()
    return columns


def states_dataset(
    keys: Sequence[str], facts: Sequence[str], columns: dict[str, np.ndarray]
) -> datasets.Dataset:
    """The states as a `datasets.Dataset` of fixed-size float32 lists (read back without copying rows)."""
    table: dict[str, pa.Array] = {"key": pa.array(list(keys)), "fact": pa.array(list(facts))}
    for name, matrix in columns.items():
        table[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(table)))
