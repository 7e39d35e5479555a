"""Reading an editor's own training split (IKE's demonstrations, T-Patcher's and UniKE's memory)."""

from __future__ import annotations

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
