"""`EditDataModule`: the test-time data side of `edit.py test`, one benchmark file or two interleaved.

Batches are lists of `EditCase` (no tensor collation: the backbone turns probes into tensors). Each
batch is the unit a test step edits: `batch_size` cases edited one at a time, or, in sequential
editing, the K cases written into one model state. `ShardedBatchSampler` splits whole batches across
DDP ranks, so run the Trainer with `use_distributed_sampler=False`. Batches reach the steps untouched
(`datamodules.case_batches.CaseDataModule`).
"""

from __future__ import annotations

from typing import Any, Literal

from torch.utils.data import DataLoader, Dataset

from core.case import EditCase
from datamodules.case_batches import CaseDataModule, collate_cases
from datamodules.dataset import EditDataset, load_edit_dataset, with_id_prefix
from datamodules.formats import FORMATS, check_template
from datamodules.images import DEFAULT_MAX_IMAGE_PIXELS
from datamodules.sampler import ShardedBatchSampler


def interleave_order(len_a: int, len_b: int) -> list[tuple[int, int]]:
    """(source, index) pairs A0, B0, A1, B1, ... with the longer dataset's tail appended."""
    order: list[tuple[int, int]] = []
    for i in range(max(len_a, len_b)):
        if i < len_a:
            order.append((0, i))
        if i < len_b:
            order.append((1, i))
    return order


class InterleavedEditDataset(Dataset[EditCase]):
    """Cross-task editing: cases of two datasets alternated, ids prefixed with their source.

    With `batch_size=10` (K) a batch then holds 5 cases of each task, SPEC.md's cross-task setting.
    """

    def __init__(self, first: EditDataset, second: EditDataset, prefixes: tuple[str, str]) -> None:
        if prefixes[0] == prefixes[1]:
            raise ValueError(f"cross-task prefixes must differ, got {prefixes}")
        self.parts = (first, second)
        self.prefixes = prefixes
        self.order = interleave_order(len(first), len(second))

    def __len__(self) -> int:
        return len(self.order)

    def case_ids(self) -> list[str]:
        ids = [part.case_ids() for part in self.parts]
        return [f"{self.prefixes[part]}/{ids[part][j]}" for part, j in self.order]

    def __getitem__(self, i: int) -> EditCase:
        part, j = self.order[i]
        return with_id_prefix(self.parts[part][j], self.prefixes[part], i)


def source_prefixes(first: EditDataset, second: EditDataset) -> tuple[str, str]:
    """Short distinct labels for two datasets: their formats, else their file stems, else fixed names."""
    for a, b in ((first.format, second.format), (first.file.stem, second.file.stem)):
        if a != b:
            return a, b
    return "main", "cross"


class EditDataModule(CaseDataModule):
    """Edit cases from an MMEdit (E-VQA / E-IC) or VLKEB annotation file, optionally mixed with a second
    task for cross-task editing."""

    def __init__(
        self,
        annotation_file: str,
        image_root: str,
        format: str = "auto",
        prompt_template: str | None = None,
        loc_image_template: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        limit: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cross_task_file: str | None = None,
        cross_task_image_root: str | None = None,
        cross_task_format: str = "auto",
        cross_task_prompt_template: str | None = None,
    ) -> None:
        """
        Args:
            annotation_file: JSON list of records (vqa_eval.json, caption_eval_edit.json, VLKEB eval*.json).
            image_root: folder that the records' image paths are relative to.
            format: `auto`, `mmedit_vqa`, `mmedit_caption` or `vlkeb`; `auto` detects it from the fields
                and the file name.
            prompt_template: template with one `{}` applied to edit, rephrase and portability questions;
                None uses the format's default (`"Question: {} Short answer:"` for E-VQA, raw otherwise).
            loc_image_template: template for the locality image question `m_loc_q`; None uses the
                format's default (the VQA template for MMEdit, raw for VLKEB).
            batch_size: cases per test step; in sequential editing this is K, the number of edits
                applied before scoring.
            num_workers: DataLoader worker processes; images are decoded in the workers.
            on_bad_record: `error` stops at the first bad record; `skip` counts and reports it.
            limit: keep only the first `limit` valid cases of each file.
            max_image_pixels: refuse images larger than this many pixels (decompression-bomb guard).
            cross_task_file: a second annotation file for cross-task editing; its cases are interleaved
                with the first file's (A0, B0, A1, B1, ...; the longer tail appended).
            cross_task_image_root: image root of the second file; None reuses `image_root`.
            cross_task_format: format of the second file, as `format`.
            cross_task_prompt_template: prompt template of the second file, as `prompt_template`.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        # Checked here, not only when the files are read, so that a bad option fails at start-up
        # (one line from the CLI) rather than from inside Lightning's setup hook.
        for option, fmt in (("format", format), ("cross_task_format", cross_task_format)):
            if fmt not in FORMATS:
                raise ValueError(f"{option} must be one of {FORMATS}, got {fmt!r}")
        for option, template in (
            ("prompt_template", prompt_template),
            ("loc_image_template", loc_image_template),
            ("cross_task_prompt_template", cross_task_prompt_template),
        ):
            if template is not None:
                check_template(template, option)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0, got {limit}")
        if max_image_pixels is not None and max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.save_hyperparameters()
        self.dataset: EditDataset | InterleavedEditDataset | None = None
        self.parts: list[EditDataset] = []

    def _load(self, file: str, root: str, fmt: str, template: str | None) -> EditDataset:
        hp = self.hparams
        return load_edit_dataset(
            annotation_file=file,
            image_root=root,
            format=fmt,
            prompt_template=template,
            loc_image_template=hp.loc_image_template,
            on_bad_record=hp.on_bad_record,
            limit=hp.limit,
            max_image_pixels=hp.max_image_pixels,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        main = self._load(hp.annotation_file, hp.image_root, hp.format, hp.prompt_template)
        self.parts = [main]
        self.dataset = main
        if hp.cross_task_file is not None:
            root = hp.cross_task_image_root if hp.cross_task_image_root is not None else hp.image_root
            cross = self._load(hp.cross_task_file, root, hp.cross_task_format, hp.cross_task_prompt_template)
            self.parts.append(cross)
            self.dataset = InterleavedEditDataset(main, cross, source_prefixes(main, cross))

    def test_dataloader(self) -> DataLoader[list[EditCase]]:
        if self.dataset is None:
            self.setup("test")
        assert self.dataset is not None
        rank, world_size = self.rank_and_world()
        sampler = ShardedBatchSampler(len(self.dataset), self.hparams.batch_size, rank, world_size)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_cases,
        )

    def case_ids(self) -> list[str]:
        """Every case id in dataset order: the order `cases.jsonl` is finally written in."""
        if self.dataset is None:
            self.setup("test")
        return self.dataset.case_ids()

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every skipped record of every loaded file, with file, index, id, field and message."""
        return [item for part in self.parts for item in part.skipped]

    def describe(self) -> dict[str, Any]:
        """The loaded data for a results summary: files, formats, templates, counts and skips."""
        if self.dataset is None:
            self.setup("test")
        parts = [part.describe() for part in self.parts]
        summary: dict[str, Any] = {
            "n_cases": len(self.dataset) if self.dataset is not None else 0,
            "n_skipped": sum(p["n_skipped"] for p in parts),
            "batch_size": self.hparams.batch_size,
            "datasets": parts,
        }
        if isinstance(self.dataset, InterleavedEditDataset):
            summary["cross_task"] = {"interleaved": True, "id_prefixes": list(self.dataset.prefixes)}
        return summary
