"""`CaseDataModule`: what every data module serving batches of `EditCase` shares.

Batches are plain lists of cases (no tensor collation: the backbone turns probes into tensors on
its own device); Lightning must hand them over untouched; a load error a worker sent along as a
marker is raised in the main process; and samplers need the process's rank and the world size.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from core.case import EditCase
from datamodules.dataset import raise_load_errors


def collate_cases(batch: list[EditCase]) -> list[EditCase]:
    """Keep the cases as they are; module-level so DataLoader workers can pickle it."""
    return list(batch)


class CaseDataModule(L.LightningDataModule):
    """A LightningDataModule whose batches are lists of `EditCase`."""

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of processes (0, 1 outside a Trainer)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Hand the cases over untouched, raising a load error that a worker sent along.

        Lightning's default walks the batch with `apply_to_collection`, which refuses frozen dataclasses
        (`Probe`) and would deep-copy every case with its images on each step. Cases hold only PIL
        images and strings; the backbone builds tensors on its own device. This runs in the main
        process, so a worker's load error (`datamodules.dataset.raise_load_errors`) ends the run here
        in one line, as it does without workers.
        """
        raise_load_errors(batch)
        return batch
