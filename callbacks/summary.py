"""`summary.json`'s content: the six scores, per-hop portability, generation twins, counts and provenance.

Built from the module that ran the test (its `run`, `hparams`, backbone, editor and resolved config)
and the data module (case order, records skipped while loading); the results writer saves it and the
results table prints it, so both show the same numbers.
"""

from __future__ import annotations

import resource
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.lifelong_summary import lifelong_summary
from callbacks.score_fields import score_fields


def peak_memory_mib() -> float:
    """Peak memory of this process so far: the GPU's allocations where there is one, else resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_summary(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """The summary of the run `module.run` holds (its records already gathered from every rank)."""
    run = module.run
    datamodule = trainer.datamodule
    order = datamodule.case_ids() if datamodule is not None else [r["case_id"] for r in run.records]
    run_skipped = [r["skipped"] for r in run.records if "skipped" in r]
    loaded_skipped = list(datamodule.skipped) if datamodule is not None else []
    hparams = module.hparams
    summary = score_fields(run.scores, hparams.max_hops)
    summary.update(
        {
            "protocol": hparams.protocol,
            "mode": hparams.mode,
            "n_cases": len(order) - len(run_skipped),
            "n_skipped": len(loaded_skipped) + len(run_skipped),
            "skipped": loaded_skipped + run_skipped,
            "data": datamodule.describe() if datamodule is not None else {},
            "backbone": module.backbone.describe(),
            "editor": module.editor.describe(),
            "edit_seconds_per_case_rank0": run.edit_seconds_per_case,
            "peak_memory_mib_rank0": round(peak_memory_mib(), 1),
            "n_resumed_rank0": run.n_resumed,
            # How the greedy answers (pre-edit locality references included) were obtained.
            "generated_rows_rank0": dict(module.backbone.generation_counts),
            "world_size": trainer.world_size,
            "config": module.run_config,
        }
    )
    if hparams.mode == "lifelong":
        # Scores at each checkpoint K and after each gap g (the headline above is K = N).
        summary["lifelong"] = lifelong_summary(run.records, hparams.max_hops, run.lifelong_timing)
    return summary
