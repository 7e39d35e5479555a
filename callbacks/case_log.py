"""Per-case results on disk: `cases.jsonl`, appended as cases finish, read back to resume a run.

Each case is one JSON line written with a single `os.write` on a file opened with `O_APPEND`, so a
line is either wholly there or not at all, and several DDP ranks can append to the same file. A run
killed mid-write can leave at most a torn last line; reading skips (and counts) it, and the case is
simply computed again. At the end, rank 0 rewrites the file in dataset order (atomically, through a
temporary file and `os.replace`) so that the same run gives the same bytes on one process or many.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CASES_FILE = "cases.jsonl"
SUMMARY_FILE = "summary.json"


class ResultsDirError(OSError):
    """The results folder cannot be created or written to; the message names the folder."""


def check_results_dir(results_dir: str | os.PathLike) -> Path:
    """Create `results_dir` and prove it writable with a real write, before any case is computed.

    A real write rather than `os.access`: tests and containers often run as root, for whom
    permission bits say nothing, and read-only mounts or a file in the way only show on writing.
    """
    folder = Path(results_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ResultsDirError(
            f"results_dir {str(folder)!r} is not writable: {err.strerror or err}"
            f"{f' ({err.filename})' if err.filename else ''}; choose another --results_dir"
        ) from err
    return folder


class CaseLog:
    """Append-only per-case log in `results_dir`, with resume support.

    A line holds either a scored case (`scores`, `predictions`) or a case the run skipped under
    `on_bad_record: skip` (`skipped`: file, index, id, field, message); keeping skips in the log lets
    a resumed or multi-process run report them without recomputing.
    """

    def __init__(self, results_dir: str | os.PathLike) -> None:
        self.dir = check_results_dir(results_dir)
        self.path = self.dir / CASES_FILE
        self.torn_lines = 0

    def repair(self) -> int:
        """Cut a torn last line (a write interrupted by a kill) so that new lines start cleanly.

        Call on one process only, before any rank appends. Returns the number of bytes cut.
        """
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        with self.path.open("r+b") as f:
            f.truncate(keep)
        self.torn_lines += 1
        return len(data) - keep

    def read(self) -> dict[str, dict[str, Any]]:
        """Cases already on disk, by case id (the last complete line wins)."""
        done: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return done
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    self.torn_lines += 1  # a write cut short by a kill: recompute that case
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.torn_lines += 1  # unreadable: the case is simply computed again
                    continue
                done[_checked(record, self.path, number)["case_id"]] = record
        return done

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def finalize(self, order: list[str]) -> list[dict[str, Any]]:
        """Rewrite the log with `order`'s cases first, in that order; return their records.

        Torn lines and duplicates are dropped. Cases of an earlier run that `order` does not name (a
        rerun over a subset) stay in the file after them, in their previous order: a smaller rerun
        never deletes computed results.
        """
        done = self.read()
        missing = [cid for cid in order if cid not in done]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} cases have no result, e.g. {missing[:3]}")
        records = [done[cid] for cid in order]
        wanted = set(order)
        kept = [record for cid, record in done.items() if cid not in wanted]
        write_atomic(
            self.path,
            "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records + kept),
        )
        return records


class CaseLogError(ValueError):
    """A line of `cases.jsonl` that parses but is not a case record (edited by hand, or another file)."""


def _checked(record: Any, path: Path, number: int) -> dict[str, Any]:
    """`record` if it is a case record; otherwise an error naming the file, the line and the field."""
    problem = None
    if not isinstance(record, dict):
        problem = f"is a JSON {type(record).__name__}, not an object"
    elif not isinstance(record.get("case_id"), str):
        problem = "has no string 'case_id'"
    elif not isinstance(record.get("scores"), dict) and not isinstance(record.get("skipped"), dict):
        problem = "has neither a 'scores' nor a 'skipped' object"
    if problem:
        raise CaseLogError(
            f"{path} line {number} {problem}; it is not a case record written by this lab. Delete that line "
            "(its case is computed again), choose a new --results_dir, or rerun with --overwrite true"
        )
    return record


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_summary(results_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    path = Path(results_dir) / SUMMARY_FILE
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
    return path
