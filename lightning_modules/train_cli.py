"""`TrainCLI`: the `LightningCLI` behind `train.py` (editors, the world backbone, whatever is trained).

The model and the data module are chosen in the YAML with `class_path` / `init_args` (subclass mode),
so one entry point trains every learned part: `EditorTraining` with `EditorTrainData` for trainable
editors, `WorldBackboneTraining` with `WorldTrainData` for the world's backbone. As `edit.py`, it
reads a base config first (`configs/train/base.yaml`), names the config file behind a parse error,
and ends a run refused for bad input (a bad record, an editor checkpoint for another backbone, an
option a class refuses) with one line and exit status 2 instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_modules.cli_base import LabCLI, user_errors_exit
from lightning_modules.config_errors import config_errors_named

#: Read before any --config: the shared defaults of every training run.
TRAIN_BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "base.yaml"

TRAIN_TRAINER_DEFAULTS: dict[str, Any] = {
    # EditorTrainData shards its own loaders (validation: whole batches, no padded duplicates, as
    # edit.py test), so Lightning must not put a DistributedSampler in their place under DDP. The
    # world backbone's stream is an IterableDataset, which Lightning never wraps anyway.
    "use_distributed_sampler": False,
    # Editors need autograd inside `apply` during validation; scoring runs under
    # torch.inference_mode in the backbone itself.
    "inference_mode": False,
}

_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: `--trainer.strategy ddp` trains with this instead. A trainable editor may hold parameters that a
#: step's loss does not use (KE's Lagrange multiplier under a weighted objective, a part trained only
#: on some batches); torch's DDP reducer stops at the second step when a parameter gets no gradient,
#: so DDP must look for unused ones. Its cost is one graph walk per step, small next to an edit.
DDP_FOR_EDITORS = "ddp_find_unused_parameters_true"


class TrainCLI(LabCLI):
    """`train.py`: any LightningModule and LightningDataModule named in the YAML, base config first."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        with config_errors_named(args, [TRAIN_BASE_CONFIG]), user_errors_exit():
            super().__init__(
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=run,
                trainer_defaults=TRAIN_TRAINER_DEFAULTS,
                save_config_kwargs={"overwrite": True},
                parser_kwargs=_parser_kwargs(run),
            )

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.strategy == "ddp":
            config.trainer.strategy = DDP_FOR_EDITORS


def _parser_kwargs(run: bool) -> dict[str, Any]:
    # The base config belongs to each subcommand's parser (`train.py fit ...`); without a subcommand
    # (run=False: tests, notebooks) to the main parser. Parse errors are raised, not printed and
    # exited on, so that `config_errors_named` can say which config file they come from.
    defaults = {"default_config_files": [str(TRAIN_BASE_CONFIG)], "exit_on_error": False}
    main = {"default_env": False, "exit_on_error": False}
    if not run:
        return {**main, **defaults}
    return {**main, **dict.fromkeys(_SUBCOMMANDS, defaults)}


def main(args: list[str] | None = None) -> TrainCLI:
    """What `python train.py` runs."""
    return TrainCLI(args=args)
