"""`KnowledgeStatesData`: batches of cached knowledge states (h_sem, h_pos, h_neg) for the UniKE encoders.

Reads the states folder `python -m knowledge.mine` wrote (`knowledge.load_knowledge_states`) once, in
`setup`, before the encoders are built (they take their width and layers from it); a missing folder, a
missing column or (with `backbone`) states of another backbone are refused there, naming the folder. Triplets are split into training and validation by a seeded
permutation (by triplet: the three states of a triplet are never on both sides). Validation batches
keep that permuted order, so a batch mixes entities and questions the way a training batch does:
in-batch retrieval accuracy then means something.

A batch is `{"sem", "pos", "neg": [B, L, H] float32, "fact": [B] int64, "index": [B] int64}`; L runs
over `layers` in order, `fact` numbers the fact a triplet asks about (one fact has many triplets:
other wordings, other renderings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from backbones.base import VLM
from knowledge.states import KnowledgeStates, load_knowledge_states
from knowledge.store import STATE_KINDS, KnowledgeStoreError


class _StateBatches(Dataset[dict[str, torch.Tensor]]):
    """Indexable by a list of rows (the sampler yields whole batches): one gather per batch, not per row."""

    def __init__(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        self.tensors = tensors
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        index = self.rows[torch.as_tensor(positions, dtype=torch.long)]
        return {**{name: t[index] for name, t in self.tensors.items()}, "index": index}


def _identity(batch: Any) -> Any:
    return batch


class KnowledgeStatesData(L.LightningDataModule):
    """Training and validation batches of one knowledge folder's states.

    Args:
        states_dir: a knowledge folder (or its `states/` folder) written by `python -m knowledge.mine`.
        val_fraction: share of the triplets held out for validation.
        batch_size: triplets per training batch (the contrastive losses compare within a batch).
        val_batch_size: triplets per validation batch (None: `batch_size`); in-batch retrieval accuracy
            is measured among this many.
        seed: seed of the split and of the training order.
        limit: use only the first `limit` triplets (quick runs).
        backbone: optional; when given, states extracted from another backbone (other sizes or other
            weights) are refused. The encoders never run it: it is loaded for this check only.
    """

    def __init__(
        self,
        states_dir: str,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        seed: int = 0,
        limit: int | None = None,
        backbone: VLM | None = None,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"KnowledgeStatesData: val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 2 or (val_batch_size is not None and val_batch_size < 2):
            raise ValueError(
                "KnowledgeStatesData: batch sizes must be >= 2 (contrastive losses compare within one)"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.states_dir = states_dir
        self.val_fraction = val_fraction
        self.limit = limit
        self.backbone_to_match = backbone
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.states: KnowledgeStates | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the states (once) and split them; a missing or mismatched folder is refused here, by name.

        Read here rather than in `__init__`, as `EditorTrainData` reads its files: an error raised while
        the CLI builds the data module reaches the user wrapped in a union-type message.
        """
        if self.states is not None:
            return
        states = load_knowledge_states(self.states_dir, self.backbone_to_match)
        n = len(states) if self.limit is None else min(self.limit, len(states))
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 2:
            raise KnowledgeStoreError(f"{states.meta.get('folder')} holds {n} triplets, too few to split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.val_rows, self.train_rows = order[:n_val], order[n_val:]
        facts = {f: i for i, f in enumerate(dict.fromkeys(states.facts))}
        self.tensors = {
            kind: torch.stack([getattr(states, kind)[layer] for layer in states.layers], 1)
            for kind in STATE_KINDS
        }
        self.tensors["fact"] = torch.tensor([facts[f] for f in states.facts], dtype=torch.long)
        self.states = states

    @property
    def layers(self) -> list[int]:
        return list(self.states.layers)

    @property
    def hidden_size(self) -> int:
        return self.states.hidden_size

    @property
    def backbone(self) -> dict[str, Any]:
        """The backbone key of the states (what the exported encoders are for)."""
        return dict(self.states.meta.get("backbone", {}))

    def train_dataloader(self) -> DataLoader:
        sampler = RandomSampler(
            range(len(self.train_rows)), generator=torch.Generator().manual_seed(self.seed)
        )
        # A short last batch would be a weaker contrastive batch; it is dropped (reshuffled next epoch).
        drop_last = len(self.train_rows) > self.batch_size
        return self._loader(self.train_rows, BatchSampler(sampler, self.batch_size, drop_last))

    def val_dataloader(self) -> DataLoader:
        sampler = SequentialSampler(range(len(self.val_rows)))
        return self._loader(self.val_rows, BatchSampler(sampler, self.val_batch_size, drop_last=False))

    def _loader(self, rows: torch.Tensor, sampler: BatchSampler) -> DataLoader:
        # The states are a few hundred MB at most and already tensors: no workers, no collation.
        return DataLoader(
            _StateBatches(self.tensors, rows), sampler=sampler, batch_size=None, collate_fn=_identity
        )
