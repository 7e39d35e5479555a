"""`EditCLI`, the command line behind `edit.py test`, and `edit_trainer`, the same Trainer for benchmarks and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.case_log import check_results_dir
from callbacks.results_table import ResultsTable
from callbacks.results_writer import ResultsWriter
from callbacks.wandb_results import WandbResults
from datamodules.edit_datamodule import EditDataModule
from lightning_modules.cli_base import LabCLI, user_errors_exit
from lightning_modules.config_errors import config_errors_named
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


def result_callbacks(results_dir: str | None, overwrite: bool = False) -> list[Callback]:
    """What an edit run writes and prints: cases.jsonl and summary.json (with a folder), then the table."""
    writer: list[Callback] = [ResultsWriter(results_dir, overwrite)] if results_dir else []
    return [*writer, ResultsTable(), WandbResults()]


def edit_trainer(results_dir: str | None = None, overwrite: bool = False, **overrides: Any) -> pl.Trainer:
    """A Trainer set up as `edit.py test` sets it up (for benchmarks, notebooks and tests)."""
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    callbacks = [*overrides.pop("callbacks", []), *result_callbacks(results_dir, overwrite)]
    return pl.Trainer(
        **{"accelerator": "cpu", **EDIT_TRAINER_DEFAULTS, **quiet, **overrides, "callbacks": callbacks}
    )


class EditCLI(LabCLI):
    """`edit.py`: EditEval + EditDataModule, with `--results_dir` at the top level."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        with config_errors_named(args, [EDIT_BASE_CONFIG]), user_errors_exit():
            super().__init__(
                EditEval,
                EditDataModule,
                args=args,
                run=run,
                trainer_defaults=EDIT_TRAINER_DEFAULTS,
                # summary.json records the full resolved config next to the results it produced; a
                # config.yaml dropped into the working folder by every run would only be clutter.
                save_config_callback=None,
                parser_kwargs=_parser_kwargs(run),
            )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--results_dir",
            type=str | None,
            default=None,
            help="Folder for cases.jsonl (per case, written as it goes) and summary.json; a rerun of the same "
            "run (run.json) resumes.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="When --results_dir holds another run's results, delete them and start afresh.",
        )
        # The loop's own setting, given once: a case that turns out bad while scoring is handled as
        # the data module handles a bad record.
        parser.link_arguments("data.on_bad_record", "model.on_bad_record")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # The result callbacks come after any the config names, so they see the finished run.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        named = list(config["trainer"].get("callbacks") or [])
        return super().instantiate_trainer(
            **kwargs,
            callbacks=[*named, *result_callbacks(config.get("results_dir"), bool(config.get("overwrite")))],
        )

    def after_test(self) -> None:
        if not self.model.run.started:
            report_empty_run(self.trainer, self.model)

    def before_test(self) -> None:
        # The full, resolved configuration goes into summary.json: every number is reproducible from it.
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.run_config = config.clone().as_dict()
        # Fail on an unusable results folder now, before the data is read and any case is computed.
        if config.get("results_dir"):
            check_results_dir(config.results_dir)


def report_empty_run(trainer: pl.Trainer, module: EditEval) -> None:
    """Write and print the results of a run that had no case to edit (all skipped, `limit 0`, an empty file).

    Lightning skips every hook of a test loop without batches, so the result callbacks are run here:
    the summary says n_cases 0 and lists the skips with their reasons, and an older summary in the
    folder is replaced rather than left to look like this run's.
    """
    module.run.scores = module.scores.compute()
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsWriter | ResultsTable):
            callback.on_test_start(trainer, module)
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsWriter | ResultsTable):
            callback.on_test_end(trainer, module)
    skipped = module.run.summary["n_skipped"] if module.run.summary else 0
    print(f"no case to edit: the data gave 0 cases ({skipped} records skipped; reasons in the summary)")


def _parser_kwargs(run: bool) -> dict[str, Any]:
    # The base config belongs to the subcommand's parser (`edit.py test ...`); without a
    # subcommand (run=False, used by tests and notebooks) it belongs to the main parser.
    # Parse errors are raised, not printed and exited on, so that `config_errors_named` can say
    # which config file they come from.
    defaults = {"default_config_files": [str(EDIT_BASE_CONFIG)], "exit_on_error": False}
    main = {"default_env": False, "exit_on_error": False}
    return {**main, **({"test": defaults} if run else defaults)}
