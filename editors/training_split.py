"""Reading an editor's own training split (IKE's demonstrations, T-Patcher's and UniKE's memory, the
corpus of ROME / MEMIT / AlphaEdit's key statistics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from core.case import EditCase


def read_training_cases(
    file: str,
    image_root: str,
    format: str = "auto",
    prompt_template: str | None = None,
    loc_image_template: str | None = None,
    on_bad_record: str = "error",
    limit: int | None = None,
) -> list[EditCase]:
    """Every case of an annotation file, through the same loaders as `edit.py` (skips counted there)."""
    # Imported here so that editors never pull in the data stack unless a file is read.
    from datamodules.dataset import load_edit_dataset

    dataset = load_edit_dataset(
        file,
        image_root,
        format=format,
        prompt_template=prompt_template,
        loc_image_template=loc_image_template,
        on_bad_record=on_bad_record,
        limit=limit,
    )
    return [dataset[i] for i in range(len(dataset))]


def split_option_problems(max_records: int | None, on_bad_record: str) -> list[str]:
    """What is wrong with the options every training split shares (empty when nothing)."""
    problems = []
    if max_records is not None and max_records < 1:
        problems.append(f"max_records must be >= 1 or None, got {max_records}")
    if on_bad_record not in ("error", "skip"):
        problems.append(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    return problems


class ReadsTrainingSplit:
    """An editor whose training split is an annotation file, or cases handed over by `from_cases`.

    The editor's `__init__` stores `image_root`, `format`, `prompt_template`, `max_records` and
    `on_bad_record` (and `loc_image_template` where it has one) under those names; which option
    names the file differs (`train_file`, `memory_file`), so `read_split` takes it.
    """

    image_root: str
    format: str
    prompt_template: str | None
    max_records: int | None
    on_bad_record: str
    #: The split given in code (`from_cases`); None: read the file.
    split_cases: list[EditCase] | None = None

    @classmethod
    def from_cases(cls, cases: Sequence[EditCase], **kwargs: object) -> Self:
        """The editor with `cases` as its training split rather than a file's records."""
        editor = cls(**kwargs)
        editor.split_cases = list(cases)
        return editor

    def read_split(self, file: str | None, option: str, purpose: str) -> list[EditCase]:
        """The split's cases (the first `max_records`); `option` and `purpose` word the missing-file error."""
        name = type(self).__name__
        if self.split_cases is not None:
            cases = self.split_cases
        elif file is not None:
            cases = read_training_cases(
                file,
                self.image_root,
                format=self.format,
                prompt_template=self.prompt_template,
                loc_image_template=getattr(self, "loc_image_template", None),
                on_bad_record=self.on_bad_record,
                limit=self.max_records,
            )
        else:
            raise ValueError(f"{name}: give {option} ({purpose}) or build the editor with {name}.from_cases")
        return cases[: self.max_records] if self.max_records is not None else cases
