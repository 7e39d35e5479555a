"""`EditDataset`: an annotation file parsed into edit cases whose images are decoded on access.

`load_edit_dataset` reads and validates every record up front (fields, types, portability items,
duplicate ids, and that each image file exists, by `stat` only) so a bad benchmark file fails before
an hour of editing, not in the middle of it. Images are decoded in `__getitem__`, i.e. in DataLoader
workers when there are any, and memoised per case: Rel, T-Gen and Port share the edit image, which is
decoded once and the same `PIL.Image` object is handed to each of those probes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from core.case import PROBE_KINDS, EditCase, Probe
from datamodules.formats import (
    DEFAULT_LOC_IMAGE_TEMPLATES,
    DEFAULT_PROMPT_TEMPLATES,
    FORMATS,
    CasePlan,
    ProbePlan,
    Templates,
    check_template,
    detect_format,
    port_style,
    record_plan,
)
from datamodules.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader, ImageLoadError
from datamodules.records import (
    BadRecordError,
    RecordIssues,
    RecordReader,
    check_encodable,
    read_json_list,
    record_id,
)


class EditDataset(Dataset[EditCase]):
    """Edit cases of one annotation file; `dataset[i]` decodes that case's images as RGB."""

    def __init__(
        self,
        file: Path,
        plans: list[CasePlan],
        loader: ImageLoader,
        fmt: str,
        port_style: str | None,
        templates: Templates,
        n_records: int,
        skipped: list[dict[str, Any]],
        skip_reasons: dict[str, int],
        on_bad_record: str = "error",
    ) -> None:
        self.file = file
        self.on_bad_record = on_bad_record
        self.plans = plans
        self.loader = loader
        self.format = fmt
        self.port_style = port_style
        self.templates = templates
        self.n_records = n_records
        self.skipped = skipped
        self._skip_reasons = skip_reasons

    def case_ids(self) -> list[str]:
        """Case ids in dataset order, without decoding any image."""
        return [plan.case_id for plan in self.plans]

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> EditCase:
        try:
            return self._case(i)
        except BadRecordError as exc:
            # An image that only fails when decoded (truncated, corrupt, too large) is found here,
            # often in a loader worker. Under `skip` the case travels on as a skip marker, so the loop
            # counts and reports it like any other bad record instead of the run ending. Under
            # `error` a worker must not raise either: torch re-raises a worker's exception as a
            # 100-line traceback, so the marker travels to the main process, which raises it there
            # (`raise_load_errors`) as the same one-line error as without workers.
            if self.on_bad_record != "skip" and get_worker_info() is None:
                raise
            plan = self.plans[i]
            return EditCase(
                case_id=plan.case_id,
                index=i,
                edit=Probe(prompt="", answer=""),
                probes={},
                source=self.format,
                skip_reason=exc.as_dict(),
                meta={RAISE_IN_MAIN: self.on_bad_record != "skip"},
            )

    def _case(self, i: int) -> EditCase:
        plan = self.plans[i]
        memo: dict[str, Image.Image] = {}
        edit = self._probe(plan, plan.edit, memo)
        probes = {
            kind: [self._probe(plan, p, memo) for p in plan.probes.get(kind, [])] for kind in PROBE_KINDS
        }
        # The edit and the Rel probe are one and the same question; keep them one object.
        if plan.probes.get("rel") and plan.probes["rel"][0] is plan.edit:
            probes["rel"][0] = edit
        extra = [self._probe(plan, p, memo) for p in plan.extra_edits]
        meta = {**plan.meta, "record_index": plan.record_index, "annotation_file": str(self.file)}
        return EditCase(
            case_id=plan.case_id,
            index=i,
            edit=edit,
            probes=probes,
            extra_edits=extra,
            source=self.format,
            meta=meta,
        )

    def _probe(self, plan: CasePlan, p: ProbePlan, memo: dict[str, Image.Image]) -> Probe:
        image = None
        if p.image is not None:
            image = memo.get(p.image)
            if image is None:
                try:
                    image = self.loader.load(p.image)
                except ImageLoadError as exc:
                    raise BadRecordError(
                        self.file,
                        str(exc),
                        index=plan.record_index,
                        case_id=plan.case_id,
                        field=p.image_field,
                    ) from exc
                memo[p.image] = image
        return Probe(prompt=p.prompt, answer=p.answer, image=image, kind=p.kind, hop=p.hop)

    def describe(self) -> dict[str, Any]:
        """What was loaded and how: enough for a results file to say which data and templates it used."""
        hops = sorted(
            {p.hop for plan in self.plans for p in plan.probes.get("port", []) if p.hop is not None}
        )
        return {
            "file": str(self.file),
            "image_root": str(self.loader.root),
            "format": self.format,
            "port_style": self.port_style,
            "prompt_template": self.templates.prompt,
            "loc_image_template": self.templates.loc_image,
            "n_records": self.n_records,
            "n_cases": len(self.plans),
            "n_skipped": len(self.skipped),
            "skip_reasons": dict(self._skip_reasons),
            "port_hops": hops,
            "n_port_probes": sum(len(plan.probes.get("port", [])) for plan in self.plans),
            "n_extra_edits": sum(len(plan.extra_edits) for plan in self.plans),
        }


def _check_images(reader: RecordReader, plan: CasePlan, loader: ImageLoader) -> None:
    for field, path in plan.image_refs():
        try:
            loader.check(path)
        except ImageLoadError as exc:
            raise reader.error(field, str(exc)) from exc


def load_edit_dataset(
    annotation_file: str,
    image_root: str,
    format: str = "auto",
    prompt_template: str | None = None,
    loc_image_template: str | None = None,
    on_bad_record: str = "error",
    limit: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> EditDataset:
    """Parse an MMEdit (E-VQA / E-IC) or VLKEB annotation file into an `EditDataset`.

    Args:
        annotation_file: JSON list of records (SPEC.md section 1).
        image_root: folder the records' image paths are relative to.
        format: `auto`, `mmedit_vqa`, `mmedit_caption` or `vlkeb` (see `formats.detect_format`).
        prompt_template: template with one `{}` for `src`, `rephrase` and portability questions;
            None takes the format's default (VQA template for E-VQA, raw otherwise).
        loc_image_template: template for `m_loc_q`; None takes the format's default (the VQA template
            for both MMEdit formats, as the reference code does; raw for VLKEB).
        on_bad_record: `error` raises `BadRecordError` at the first bad record; `skip` counts it and
            keeps the reason in `dataset.skipped`.
        limit: keep only the first `limit` valid cases.
        max_image_pixels: decompression-bomb guard, width * height.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    issues = RecordIssues(on_bad_record)
    file = Path(annotation_file)
    loader = ImageLoader(image_root, max_image_pixels)
    if not loader.root.is_dir():
        # Named like a bad record (file and setting), so the CLI shows one line, not a traceback.
        raise BadRecordError(file, f"image_root {image_root!r} is not a directory", field="image_root")
    records = read_json_list(file)
    if format == "auto":
        fmt, style = detect_format(file, records)
    else:
        fmt, style = format, port_style(records) if format == "vlkeb" else None
    templates = Templates(
        prompt=check_template(
            DEFAULT_PROMPT_TEMPLATES[fmt] if prompt_template is None else prompt_template, "prompt_template"
        ),
        loc_image=check_template(
            DEFAULT_LOC_IMAGE_TEMPLATES[fmt] if loc_image_template is None else loc_image_template,
            "loc_image_template",
        ),
    )
    plans: list[CasePlan] = []
    seen_ids: dict[str, int] = {}
    for index, record in enumerate(records):
        if limit is not None and len(plans) >= limit:
            break
        try:
            check_encodable(file, index, record)
            case_id = record_id(file, index, record)
            reader = RecordReader(file, index, record, case_id)
            if not isinstance(record, dict):
                raise reader.error(None, f"expected a JSON object, got {type(record).__name__}")
            if case_id in seen_ids:
                raise reader.error(
                    "id" if "id" in record else "case_id",
                    f"duplicate case id {case_id!r}, first used by record {seen_ids[case_id]}",
                )
            plan = record_plan(reader, fmt, templates)
            _check_images(reader, plan, loader)
        except BadRecordError as exc:
            issues.handle(exc)
            continue
        seen_ids[case_id] = index
        plans.append(plan)
    return EditDataset(
        file=file,
        plans=plans,
        loader=loader,
        fmt=fmt,
        port_style=style,
        templates=templates,
        n_records=len(records),
        skipped=issues.skipped,
        skip_reasons=issues.reasons(),
        on_bad_record=on_bad_record,
    )


#: Meta key of a marker case whose load error must end the run once it reaches the main process.
RAISE_IN_MAIN = "raise_load_error_in_main_process"


def raise_load_errors(cases: list[EditCase]) -> None:
    """Raise, in the main process, the load error a worker sent along instead of raising it there."""
    for case in cases:
        if case.skip_reason is not None and case.meta.get(RAISE_IN_MAIN):
            reason = case.skip_reason
            raise BadRecordError(
                reason["file"],
                reason["message"],
                index=reason["index"],
                case_id=reason["id"],
                field=reason["field"],
            )


def with_id_prefix(case: EditCase, prefix: str, index: int) -> EditCase:
    """A copy of `case` whose id carries its source prefix, placed at `index` of a combined dataset."""
    return replace(
        case, case_id=f"{prefix}/{case.case_id}", index=index, meta={**case.meta, "id_prefix": prefix}
    )
