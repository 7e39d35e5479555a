"""The `LightningCLI` subclasses behind `edit.py` and `train.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from datamodules.edit_datamodule import EditDataModule
from lightning_modules.edit_eval import EditEval

#: Read before any --config: the shared defaults of every edit run (tiny LLaVA, the sample data).
EDIT_BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "edit" / "base.yaml"

EDIT_TRAINER_DEFAULTS: dict[str, Any] = {
    # Shards are whole batches dealt round-robin with no padding (see datamodules.sampler), so
    # Lightning must not wrap the loader in a DistributedSampler that pads with duplicates.
    "use_distributed_sampler": False,
    # Editors need gradients inside the test loop (fine-tuning, hypernetwork inputs); scoring itself
    # runs under torch.inference_mode in the backbone.
    "inference_mode": False,
    "enable_checkpointing": False,
}


class EditCLI(LightningCLI):
    """`edit.py`: EditEval + EditDataModule, with `--results_dir` at the top level."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            EditEval,
            EditDataModule,
            args=args,
            run=run,
            trainer_defaults=EDIT_TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=_parser_kwargs(run),
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--results_dir",
            type=str | None,
            default=None,
            help="Folder for cases.jsonl (per case, written as it goes) and summary.json; reruns resume.",
        )
        parser.link_arguments("results_dir", "model.results_dir")

    def before_test(self) -> None:
        # The full, resolved configuration goes into summary.json: every number is reproducible from it.
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.run_config = config.clone().as_dict()


def _parser_kwargs(run: bool) -> dict[str, Any]:
    # The base config belongs to the subcommand's parser (`edit.py test ...`); without a
    # subcommand (run=False, used by tests and notebooks) it belongs to the main parser.
    defaults = {"default_config_files": [str(EDIT_BASE_CONFIG)]}
    return {"default_env": False, **({"test": defaults} if run else defaults)}
