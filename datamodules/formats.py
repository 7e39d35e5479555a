"""Benchmark schemas (MMEdit E-VQA / E-IC, VLKEB) mapped onto undecoded edit-case plans.

A record becomes a `CasePlan`: the same shape as an `EditCase` but with image *paths*, so a dataset
can validate and hold thousands of records without decoding a single image. Field names follow
SPEC.md section 1:

- core (all formats): rel = (image, src, alt), t_gen = (image, rephrase, alt),
  i_gen = (image_rephrase, src, alt), t_loc = (None, loc, loc_ans), i_loc = (m_loc, m_loc_q, m_loc_a);
- VLKEB `port_new` (eval_multihop.json): `{"port_type": "k-hop", "Q&A": {"Question", "Answer"}}` ->
  a `port` probe with hop k on the edit image;
- VLKEB `port_new` (eval_edit_onehop.json): `{port_q, port_a, port_edit_q, port_edit_a}` -> an extra
  edit (edit image, port_edit_q -> port_edit_a) plus a `port` probe (edit image, port_q -> port_a)
  with hop None: the benchmark does not say how many hops remain once the one-hop fact is edited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.records import BadRecordError, RecordReader

FORMATS = ("auto", "mmedit_vqa", "mmedit_caption", "vlkeb")
#: The MMEdit reference template for VQA questions (edit questions and every locality image question).
VQA_TEMPLATE = "Question: {} Short answer:"
PLAIN_TEMPLATE = "{}"
#: Default prompt template for `src`, `rephrase` and portability questions, per resolved format.
DEFAULT_PROMPT_TEMPLATES = {
    "mmedit_vqa": VQA_TEMPLATE,
    "mmedit_caption": PLAIN_TEMPLATE,
    "vlkeb": PLAIN_TEMPLATE,
}
#: Default template for `m_loc_q`. MMEdit templates the locality image question for E-VQA *and* E-IC;
#: VLKEB is used without the VQA template (SPEC.md section 1).
DEFAULT_LOC_IMAGE_TEMPLATES = {
    "mmedit_vqa": VQA_TEMPLATE,
    "mmedit_caption": VQA_TEMPLATE,
    "vlkeb": PLAIN_TEMPLATE,
}
CORE_FIELDS = (
    "src",
    "alt",
    "rephrase",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
_HOP = re.compile(r"^\s*(\d+)\s*-?\s*hops?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ProbePlan:
    """A probe before decoding: `image` is a path relative to the image root; `image_field` names the
    record field it came from so a decode error can point at it."""

    kind: str
    prompt: str
    answer: str
    image: str | None
    image_field: str | None
    hop: int | None = None


@dataclass
class CasePlan:
    """An `EditCase` before decoding (see `core.case.EditCase`)."""

    case_id: str
    record_index: int
    edit: ProbePlan
    probes: dict[str, list[ProbePlan]]
    extra_edits: list[ProbePlan] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def image_refs(self) -> list[tuple[str, str]]:
        """(field, path) for every image the case uses, edit and extra edits included."""
        plans = [self.edit, *self.extra_edits, *(p for ps in self.probes.values() for p in ps)]
        return [(p.image_field or "image", p.image) for p in plans if p.image is not None]


def check_template(template: str, option: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"{option} must be a string with exactly one '{{}}' placeholder, got {template!r}")
    return template


def apply_template(template: str, text: str) -> str:
    # str.replace rather than str.format: questions and templates may contain literal braces.
    return template.replace("{}", text, 1)


def port_style(records: list[Any]) -> str | None:
    """`multihop` or `onehop` from the first portability item that says which, else None."""
    for rec in records:
        items = rec.get("port_new") if isinstance(rec, dict) else None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and ("Q&A" in item or "port_type" in item):
                return "multihop"
            if isinstance(item, dict) and "port_q" in item:
                return "onehop"
    return None


def detect_format(file: Path, records: list[Any]) -> tuple[str, str | None]:
    """Resolve `format="auto"` to (format, port style) from the records' fields and the file name.

    Rules, first match wins: a `port_new` item with `Q&A`/`port_type` -> vlkeb multihop; with `port_q`
    -> vlkeb onehop; a `port_new` field at all, or images under `VLKEB_images/` -> vlkeb; a file name
    containing "caption" -> mmedit_caption; the MMEdit core fields -> mmedit_vqa.
    """
    dicts = [r for r in records if isinstance(r, dict)]
    style = port_style(records)
    if style is not None:
        return "vlkeb", style
    if any("port_new" in r for r in dicts):
        return "vlkeb", None
    if any(
        isinstance(r.get("image"), str) and r["image"].replace("\\", "/").startswith("VLKEB_images/")
        for r in dicts
    ):
        return "vlkeb", None
    if "caption" in file.name.lower():
        return "mmedit_caption", None
    if dicts and all(f in dicts[0] for f in ("src", "alt", "image")):
        return "mmedit_vqa", None
    seen = sorted(dicts[0]) if dicts else []
    raise BadRecordError(
        file,
        f"cannot detect the format (first record has fields {seen}); expected the MMEdit/VLKEB fields "
        f"{list(CORE_FIELDS)}, or pass format= one of {FORMATS[1:]}",
    )


@dataclass(frozen=True)
class Templates:
    prompt: str
    loc_image: str


def core_plan(reader: RecordReader, fmt: str, templates: Templates) -> CasePlan:
    """The five probes every MMEdit and VLKEB record has."""
    values = {f: reader.text(f) for f in CORE_FIELDS}
    src = apply_template(templates.prompt, values["src"])
    rephrase = apply_template(templates.prompt, values["rephrase"])
    alt = values["alt"]
    edit = ProbePlan("rel", src, alt, values["image"], "image")
    probes = {
        "rel": [edit],
        "t_gen": [ProbePlan("t_gen", rephrase, alt, values["image"], "image")],
        "i_gen": [ProbePlan("i_gen", src, alt, values["image_rephrase"], "image_rephrase")],
        "t_loc": [ProbePlan("t_loc", values["loc"], values["loc_ans"], None, None)],
        "i_loc": [
            ProbePlan(
                "i_loc",
                apply_template(templates.loc_image, values["m_loc_q"]),
                values["m_loc_a"],
                values["m_loc"],
                "m_loc",
            )
        ],
        "port": [],
    }
    meta = {"pred": reader.optional_text("pred"), "src": values["src"], "format": fmt}
    return CasePlan(reader.case_id or "", reader.index, edit, probes, meta=meta)


def _hop_count(reader: RecordReader, where: str, value: Any) -> int:
    match = _HOP.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise reader.error(where, f"expected a hop type like '1-hop'..'4-hop', got {value!r:.60}")
    return int(match.group(1))


def _item_text(reader: RecordReader, where: str, item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in item else f"{type(value).__name__} {value!r:.60}"
        raise reader.error(f"{where}.{key}", f"expected a non-empty string, got {got}")
    return value


def add_vlkeb_portability(reader: RecordReader, plan: CasePlan, templates: Templates) -> None:
    """Add `port_new` items (either VLKEB layout, decided per item) as port probes and extra edits."""
    if reader.record.get("port_new") is None:
        return
    image = plan.edit.image
    items = reader.list_of_dicts("port_new")
    for j, item in enumerate(items):
        where = f"port_new[{j}]"
        if "Q&A" in item or "port_type" in item:
            hop = _hop_count(reader, f"{where}.port_type", item.get("port_type"))
            qa = item.get("Q&A")
            if not isinstance(qa, dict):
                raise reader.error(
                    f"{where}.Q&A", f"expected an object with Question and Answer, got {qa!r:.60}"
                )
            question = _item_text(reader, f"{where}.Q&A", qa, "Question")
            answer = _item_text(reader, f"{where}.Q&A", qa, "Answer")
            plan.probes["port"].append(
                ProbePlan("port", apply_template(templates.prompt, question), answer, image, "image", hop)
            )
        elif "port_q" in item or "port_edit_q" in item:
            texts = {
                k: _item_text(reader, where, item, k)
                for k in ("port_q", "port_a", "port_edit_q", "port_edit_a")
            }
            edit_q = apply_template(templates.prompt, texts["port_edit_q"])
            plan.extra_edits.append(ProbePlan("rel", edit_q, texts["port_edit_a"], image, "image"))
            port_q = apply_template(templates.prompt, texts["port_q"])
            plan.probes["port"].append(ProbePlan("port", port_q, texts["port_a"], image, "image", None))
        else:
            raise reader.error(
                where,
                f"unknown portability item with keys {sorted(item)}; expected {{port_type, Q&A}} "
                "(eval_multihop.json) or {port_q, port_a, port_edit_q, port_edit_a} (eval_edit_onehop.json)",
            )


def record_plan(reader: RecordReader, fmt: str, templates: Templates) -> CasePlan:
    """Validate one record of a resolved format and map it to a `CasePlan`."""
    if not isinstance(reader.record, dict):
        raise reader.error(None, f"expected a JSON object, got {type(reader.record).__name__}")
    plan = core_plan(reader, fmt, templates)
    if fmt == "vlkeb":
        add_vlkeb_portability(reader, plan, templates)
    return plan
