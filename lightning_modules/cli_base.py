"""What both command lines share: one line and exit 2 for the user's mistakes, and options checked at start-up.

`edit.py` (`EditCLI`) and `train.py` (`TrainCLI`) derive from `LabCLI`: a class that refuses an
option value in its `__init__` (batch_size 0, steps -3, an unknown format) ends the run with one
line, as bad data, an unusable results folder or an editor checkpoint for another backbone do
(`USER_ERRORS`), instead of a traceback through Lightning.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from lightning.pytorch.cli import LightningCLI

from backbones.base import PromptTooLongError
from callbacks.case_log import CaseLogError, ResultsDirError
from callbacks.run_identity import RunMismatchError
from datamodules.images import ImageLoadError
from datamodules.records import BadRecordError
from editors.checkpoint import EditorCheckpointError
from knowledge.store import KnowledgeStoreError
from lightning_modules.lifelong import LifelongSetupError


class OptionValueError(ValueError):
    """An option value that the class it configures refused (raised from its __init__)."""


#: Problems with what the user gave (data, images, results folder, checkpoints), as opposed to bugs:
#: these end a run with one line naming the file and the fix, not a traceback through Lightning.
USER_ERRORS: tuple[type[Exception], ...] = (
    BadRecordError,
    ImageLoadError,
    PromptTooLongError,
    ResultsDirError,
    EditorCheckpointError,
    RunMismatchError,
    CaseLogError,
    OptionValueError,
    KnowledgeStoreError,
    LifelongSetupError,
)
#: The exit status of a run refused for bad input (argparse uses 2 for bad arguments, too).
USER_ERROR_EXIT_CODE = 2


class LabCLI(LightningCLI):
    """A `LightningCLI` whose classes' own option checks end in one line (`OptionValueError`)."""

    def instantiate_classes(self) -> None:
        # The classes validate their own options in __init__; such a ValueError is the user's
        # option, not a bug, so it ends in one line.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:
            if isinstance(exc, USER_ERRORS):
                raise
            raise OptionValueError(f"invalid option: {exc}") from exc


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """Turn `USER_ERRORS` into one line on stderr and `SystemExit(2)`; the original stays as `__cause__`.

    Lightning re-raises errors from hooks and data loading as they are, under a traceback dozens of
    frames deep; the message (file, record, id, field, expectation) is all a user needs.
    """
    try:
        yield
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from exc
