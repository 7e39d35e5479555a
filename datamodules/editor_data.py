"""`EditorTrainData`: the training and validation splits that trainable editors learn from.

MEND, KE, SERAC and UniKE train on a benchmark's training split and are validated on its validation
split (MMEdit's `vqa_train.json` / `vqa_val.json`, VLKEB's `train.json` / `val.json`, the synthetic
world's files of both schemas). Both are read by the loaders `edit.py test` uses
(`load_edit_dataset`), so a training case is the same `EditCase`, with the same templates, checks and
bad-record handling, as an evaluation case.

Batches are lists of `EditCase`. The training order is shuffled afresh each epoch from `seed` and the
epoch number (a `DistributedSampler`, which deals the shuffled cases out to DDP ranks and which
Lightning leaves in place), so a run repeats exactly. Validation batches are fixed consecutive runs
of cases, whole batches dealt to ranks without padding (`ShardedBatchSampler`), as in `edit.py test`:
no case is scored twice (a rank short of batches gets empty ones, so every rank ends the epoch). The Trainer must therefore run with `use_distributed_sampler=False` under
DDP (`train.py`'s default).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from torch.utils.data import DataLoader, DistributedSampler, Sampler

from core.case import EditCase
from datamodules.case_batches import CaseDataModule, collate_cases
from datamodules.dataset import EditDataset, load_edit_dataset
from datamodules.formats import FORMATS, check_template
from datamodules.images import DEFAULT_MAX_IMAGE_PIXELS
from datamodules.sampler import ShardedBatchSampler


class EqualShardsBatchSampler(Sampler[list[int]]):
    """`ShardedBatchSampler`'s batches of one rank, then empty batches up to the ranks' largest count.

    Under DDP every rank must run the validation epoch's end, where the scores are synced: Lightning
    skips the whole validation loop, hooks included, on a rank without batches, and the others would
    wait for it forever. An empty batch scores nothing and duplicates no case.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.shard = ShardedBatchSampler(num_items, batch_size, rank, world_size)
        self.steps = -(-self.shard.num_batches_total // world_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.shard
        for _ in range(self.steps - len(self.shard)):
            yield []

    def __len__(self) -> int:
        return self.steps


class EditorTrainData(CaseDataModule):
    """Training and validation edit cases for `EditorTraining`.

    Args:
        train_file: JSON list of training records (MMEdit E-VQA / E-IC or VLKEB schema).
        val_file: JSON list of validation records; None: no validation.
        image_root: folder the records' image paths are relative to.
        format: `auto`, `mmedit_vqa`, `mmedit_caption` or `vlkeb` (both files).
        prompt_template: template with one `{}` for edit, rephrase and portability questions; None
            uses the format's default (`"{}"` for the world's raw questions).
        loc_image_template: template for the locality image question; None uses the format's default.
        batch_size: training cases per optimiser step.
        val_batch_size: validation cases per step (edited one at a time in `one_step` mode).
        train_limit: keep only the first `train_limit` valid training cases.
        val_limit: keep only the first `val_limit` valid validation cases.
        num_workers: DataLoader worker processes; images are decoded in the workers.
        on_bad_record: `error` stops at the first bad record; `skip` counts it and goes on.
        seed: seed of the training order (reshuffled each epoch from seed + epoch).
        max_image_pixels: refuse images larger than this many pixels (decompression-bomb guard).
        val_image_root: image root of the validation file; None reuses `image_root`.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None,
        image_root: str,
        format: str = "auto",
        prompt_template: str | None = None,
        loc_image_template: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 8,
        train_limit: int | None = None,
        val_limit: int | None = None,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        seed: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        val_image_root: str | None = None,
    ) -> None:
        super().__init__()
        # Checked here so that a bad option ends the run at start-up, in one line from the CLI.
        for option, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        for option, value in (("train_limit", train_limit), ("val_limit", val_limit)):
            if value is not None and value < 0:
                raise ValueError(f"{option} must be None or >= 0, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        for option, template in (
            ("prompt_template", prompt_template),
            ("loc_image_template", loc_image_template),
        ):
            if template is not None:
                check_template(template, option)
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if max_image_pixels is not None and max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
        self.save_hyperparameters()
        self.train_set: EditDataset | None = None
        self.val_set: EditDataset | None = None

    def _load(self, file: str, root: str, limit: int | None) -> EditDataset:
        hp = self.hparams
        return load_edit_dataset(
            annotation_file=file,
            image_root=root,
            format=hp.format,
            prompt_template=hp.prompt_template,
            loc_image_template=hp.loc_image_template,
            on_bad_record=hp.on_bad_record,
            limit=limit,
            max_image_pixels=hp.max_image_pixels,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        # Training reads both files; validate reads the validation file only.
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._load(hp.train_file, hp.image_root, hp.train_limit)
        if self.val_set is None and hp.val_file is not None:
            root = hp.val_image_root if hp.val_image_root is not None else hp.image_root
            self.val_set = self._load(hp.val_file, root, hp.val_limit)

    def train_dataloader(self) -> DataLoader[list[EditCase]]:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        rank, world_size = self.rank_and_world()
        # A DistributedSampler even in one process: a per-epoch shuffle from seed + epoch that
        # Lightning re-seeds through set_epoch and does not replace under DDP. Under DDP it pads the
        # last round with repeats, so every rank takes the same number of steps.
        sampler = DistributedSampler(
            self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=self.hparams.seed
        )
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_cases,
        )

    def val_dataloader(self) -> DataLoader[list[EditCase]] | list[Any]:
        if self.hparams.val_file is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        rank, world_size = self.rank_and_world()
        sampler = EqualShardsBatchSampler(len(self.val_set), self.hparams.val_batch_size, rank, world_size)
        return DataLoader(
            self.val_set,
            batch_sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_cases,
        )

    def describe(self) -> dict[str, Any]:
        """The loaded splits: files, formats, templates, counts and skips."""
        self.setup("fit")
        return {
            "train": self.train_set.describe() if self.train_set is not None else None,
            "val": self.val_set.describe() if self.val_set is not None else None,
            "batch_size": self.hparams.batch_size,
            "val_batch_size": self.hparams.val_batch_size,
            "seed": self.hparams.seed,
        }
