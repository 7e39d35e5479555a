"""`WandbResults`: what an edit run shows on Weights & Biases, offline by default (`wandb sync` later).

Through the run's `WandbLogger` (none: this callback does nothing), at the end of `edit.py test`:

- the resolved config, the six scores and their generation twins, portability per hop, edit time
  per case and peak memory as the run summary;
- a per-case `wandb.Table`: the edit image, the edit prompt and target, the edited model's
  teacher-forced and greedy answers to it, the locality answers before and after the edit, and the
  case's scores;
- the radar and bar plots of `reporting.plots` as images.

Images are taken from the batches as they pass (`on_test_batch_end`) and kept small (thumbnails),
so the table costs little memory on long runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.summary import build_summary
from core.case import PROBE_KINDS
from reporting import plots
from reporting.collect import RunRow

#: Largest side of the edit images in the table.
THUMBNAIL = 128

COLUMNS = [
    "case_id", "image", "edit_prompt", "target", "rel_tf_answer", "rel_generated",
    "t_loc_before", "t_loc_after", "i_loc_before", "i_loc_after", *PROBE_KINDS,
]  # fmt: skip


def wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbResults(Callback):
    """Log an edit run's summary, per-case table and plots to the run's W&B logger (rank 0)."""

    def __init__(self) -> None:
        self.thumbnails: dict[str, Any] = {}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.thumbnails = {}

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if wandb_logger(trainer) is None:
            return
        for case in batch:
            if case.edit.image is not None and case.case_id not in self.thumbnails:
                image = case.edit.image.copy()
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                self.thumbnails[case.case_id] = image

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        import wandb

        run = pl_module.run
        summary = run.summary if run.summary is not None else build_summary(trainer, pl_module)
        logger.log_hyperparams(pl_module.run_config or {"editor": summary["editor"]})
        experiment = logger.experiment
        experiment.summary.update(_flat_scores(summary))
        table = wandb.Table(columns=COLUMNS)
        images = []
        for record in run.records:
            if "skipped" in record:
                continue
            thumbnail = self.thumbnails.get(record["case_id"])
            image = wandb.Image(thumbnail, caption=record["case_id"]) if thumbnail is not None else None
            table.add_data(*_row(record, image))
            if image is not None:
                images.append(image)
        # The table's images reach W&B through its artifact, which an offline run stages outside its
        # folder; the same thumbnails logged as a list (captioned with the case id) stay in the run's
        # own media folder, so an offline run folder holds every picture of its table.
        payload: dict[str, Any] = {"cases": table, "case_images": images}
        artifact = wandb.Artifact(f"cases-{experiment.id}", type="edit_results")
        artifact.add(table, "cases")
        experiment.log_artifact(artifact)
        with tempfile.TemporaryDirectory() as tmp:
            payload.update(_plots(summary, pl_module.editor.name, Path(tmp)))
            experiment.log(payload)


def _flat_scores(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {f"test/{k}": summary.get(k) for k in PROBE_KINDS}
    out.update({f"test/gen_{k}": (summary.get("generation") or {}).get(k) for k in PROBE_KINDS})
    out.update({f"test/port_hop{h}": v for h, v in (summary.get("port_per_hop") or {}).items()})
    out["test/n_cases"] = summary.get("n_cases")
    out["test/n_skipped"] = summary.get("n_skipped")
    out["edit_seconds_per_case"] = summary.get("edit_seconds_per_case_rank0")
    out["peak_memory_mib"] = summary.get("peak_memory_mib_rank0")
    return {k: v for k, v in out.items() if v is not None}


def _first(record: dict[str, Any], kind: str, key: str) -> str | None:
    entries = record.get("predictions", {}).get(kind) or []
    return entries[0].get(key) if entries else None


def _row(record: dict[str, Any], image: Any) -> list[Any]:
    scores = record.get("scores", {})
    return [
        record["case_id"],
        image,
        record.get("edit", {}).get("prompt"),
        record.get("edit", {}).get("target"),
        _first(record, "rel", "tf_prediction"),
        _first(record, "rel", "generated"),
        _first(record, "t_loc", "pre_edit_generated"),
        _first(record, "t_loc", "generated"),
        _first(record, "i_loc", "pre_edit_generated"),
        _first(record, "i_loc", "generated"),
        *(None if scores.get(k) is None else round(100 * scores[k], 2) for k in PROBE_KINDS),
    ]


def _plots(summary: dict[str, Any], name: str, folder: Path) -> dict[str, Any]:
    import wandb

    row = RunRow(
        label=name,
        folder=folder,
        scores={k: summary.get(k) for k in PROBE_KINDS},
        generation={k: (summary.get("generation") or {}).get(k) for k in PROBE_KINDS},
        port_per_hop=dict(summary.get("port_per_hop") or {}),
    )
    return {
        "plots/radar": wandb.Image(str(plots.radar([row], folder / "radar.png"))),
        "plots/bars": wandb.Image(str(plots.bars([row], folder / "bars.png"))),
    }
