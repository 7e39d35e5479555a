"""Reading annotation files and validating their records, with errors a user can act on.

Every problem with a record becomes a `BadRecordError` that names the file, the record index (and id,
when known), the field, and what was expected. Depending on the `on_bad_record` policy the loader
either raises it or counts it as a skip; `RecordIssues` keeps those skips so a results summary can
report them instead of dropping records silently (as the reference MMEdit code does for empty `alt`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ON_BAD_RECORD = ("error", "skip")


class BadRecordError(ValueError):
    """A record (or the whole file) does not match the expected schema."""

    def __init__(
        self,
        file: str | Path,
        message: str,
        index: int | None = None,
        case_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file)
        self.index = index
        self.case_id = case_id
        self.field = field
        self.message = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = [self.file]
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.case_id is not None:
            where.append(f"id {self.case_id!r}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "id": self.case_id,
            "field": self.field,
            "message": self.message,
        }


def read_json_list(path: str | Path) -> list[Any]:
    """Read a JSON file whose top level must be a list of records.

    File-level problems (missing file, bad encoding, bad JSON, not a list) always raise: there is no
    record to skip.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadRecordError(path, f"cannot read annotation file: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: files saved by some Windows editors start with a byte-order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRecordError(
            path,
            f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); expected UTF-8 JSON",
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecordError(
            path,
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; expected a JSON list of records",
        ) from exc
    if not isinstance(data, list):
        raise BadRecordError(
            path, f"top level is a JSON {type(data).__name__}, expected a JSON list of records (objects)"
        )
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class RecordReader:
    """Field access for one record that raises `BadRecordError` with the record's location."""

    file: Path
    index: int
    record: dict[str, Any]
    case_id: str | None = None

    def error(self, field: str | None, message: str) -> BadRecordError:
        return BadRecordError(self.file, message, index=self.index, case_id=self.case_id, field=field)

    def has(self, field: str) -> bool:
        return field in self.record

    def text(self, field: str, allow_empty: bool = False) -> str:
        """A required string field; empty (or whitespace-only) values are refused unless allowed."""
        if field not in self.record:
            raise self.error(
                field, f"missing required field; expected a string (record has {sorted(self.record)})"
            )
        value = self.record[field]
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_type_name(value)} {value!r:.60}")
        if not allow_empty and not value.strip():
            raise self.error(field, "is empty; expected a non-empty string")
        return value

    def optional_text(self, field: str) -> str | None:
        if self.record.get(field) is None:
            return None
        return self.text(field, allow_empty=True)

    def list_of_dicts(self, field: str) -> list[dict[str, Any]]:
        value = self.record.get(field)
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of objects, got {_type_name(value)}")
        for j, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{field}[{j}]", f"expected an object, got {_type_name(item)}")
        return value


def check_encodable(file: Path, index: int, record: Any) -> None:
    """Refuse a record holding text that cannot be written as UTF-8 (a lone surrogate from `\\ud800` in the JSON).

    Such text reads fine but crashes the run later, when a tokenizer, `cases.jsonl` or the terminal
    meets it; here it is a bad field like any other (an error, or a counted skip). The message
    shows the value with escapes, so it can itself be printed.
    """

    def walk(value: Any, path: str) -> tuple[str, str] | None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, value
            return None
        items = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        )
        for key, item in items:
            if isinstance(key, str) and walk(key, path) is not None:
                return (path or "<record>"), key
            found = walk(
                item,
                f"{path}.{key}" if path and isinstance(key, str) else f"{path}[{key}]" if path else str(key),
            )
            if found is not None:
                return found
        return None

    found = walk(record, "")
    if found is not None:
        where, value = found
        raise BadRecordError(
            file,
            f"holds text that cannot be encoded as UTF-8 (a lone surrogate?): {ascii(value[:60])}",
            index=index,
            field=where or None,
        )


def record_id(file: Path, index: int, record: Any) -> str:
    """The record's own `id` / `case_id` if it has one, else `"<file stem>:<index>"`."""
    if isinstance(record, dict):
        for key in ("id", "case_id"):
            value = record.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise BadRecordError(
                    file,
                    f"expected a non-empty string or integer id, got {_type_name(value)} {value!r:.60}",
                    index=index,
                    field=key,
                )
            return str(value)
    return f"{file.stem}:{index}"


@dataclass
class RecordIssues:
    """Applies the `on_bad_record` policy and remembers every skipped record."""

    policy: str = "error"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.policy!r}")

    def handle(self, error: BadRecordError) -> None:
        """Raise under policy "error"; otherwise record the skip and its reason."""
        if self.policy == "error":
            raise error
        self.skipped.append(error.as_dict())

    def reasons(self) -> dict[str, int]:
        """Skip counts per (field, message) reason, for a one-line summary."""
        counts: dict[str, int] = {}
        for item in self.skipped:
            key = f"{item['field']}: {item['message']}" if item["field"] else item["message"]
            counts[key] = counts.get(key, 0) + 1
        return counts
