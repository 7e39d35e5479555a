"""`python -m knowledge.mine --config configs/knowledge/world_llava.yaml`: UniKE's triplets and their states.

Two stages (Section 3.3, Appendix C), both cached in the knowledge folder `out` (`knowledge/store.py`):

1. **mine**: ask the backbone every question of the sources greedily (the teacher-forced pass decides
   every one-token answer; longer ones are decoded, `VLM.generate`) and keep those it answers wrongly
   as triplets (question with image, true answer A_pos, the backbone's answer A_neg). Counts asked,
   right, wrong, kept and skipped (with reasons) are printed and stored in the key file.
2. **states**: extract h_sem, h_pos, h_neg of every triplet at the chosen layers
   (`knowledge/states.py`), two forwards per triplet, without gradients.

A rerun reuses each stage when its key matches (the backbone's fingerprint and weights digest, and the
settings that decide the content); another backbone or other settings are refused in one line naming
the folder, unless `--overwrite true`. `--stage mine` or `--stage states` runs one stage.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from PIL import Image
from tqdm import tqdm

from backbones.base import VLM, PromptTooLongError
from core.case import Probe
from datamodules.images import ImageLoadError
from datamodules.records import BadRecordError
from knowledge.extraction import extract_triplet_states, states_dataset
from knowledge.sources import AnnotationSource, Question, WithheldSource
from knowledge.store import (
    IMAGES_DIR,
    STATES_DIR,
    TRIPLET_COLUMNS,
    TRIPLETS_DIR,
    KnowledgeOptionError,
    KnowledgeStoreError,
    backbone_key,
    check_reusable,
    digest,
    ignore_in_git,
    key_differences,
    load_checked,
    save_dataset,
)
from metrics.functional import exact_match, first_line

#: Bump when what mining keeps changes for the same inputs (so cached triplets are not reused).
MINER_VERSION = 1
#: Bump when what a state means changes (position, hook point).
STATES_VERSION = 1


@dataclass
class SourceCounts:
    """What happened to one source's questions."""

    asked: int = 0
    right: int = 0
    wrong: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add(self, other: SourceCounts) -> None:
        self.asked += other.asked
        self.right += other.right
        self.wrong += other.wrong
        self.kept += other.kept
        for reason, n in other.skipped.items():
            self.skip(reason, n)

    def line(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
        return (
            f"asked {self.asked:,}, right {self.right:,}, wrong {self.wrong:,}, kept {self.kept:,}, "
            f"skipped {skipped:,}" + (f" ({reasons})" if reasons else "")
        )


def _greedy_answers(vlm: VLM, probes: Sequence[Probe]) -> list[str | None]:
    """Each probe's greedy answer (first line, stripped); None for a probe too long for the model."""
    try:
        teacher_forced = vlm.teacher_forced(probes)
        answers: list[str | None] = list(vlm.generate(probes, teacher_forced=teacher_forced))
    except PromptTooLongError:
        if len(probes) == 1:
            return [None]
        # Rare (bad data): find the long ones one by one rather than losing the whole chunk.
        return [a for p in probes for a in _greedy_answers(vlm, [p])]
    return [first_line(a).strip() if a is not None else None for a in answers]


def mine_triplets(
    vlm: VLM, questions: Sequence[Question], chunk_size: int = 2048, progress: bool = True
) -> tuple[dict[str, list[str]], dict[str, SourceCounts]]:
    """Ask every question; keep the wrongly answered ones. Returns the triplet columns and counts per source.

    Right or wrong is the lab's exact match (normalised first line, `metrics.functional.exact_match`),
    the rule the generation scores use. A wrong answer that is empty after stripping gives no negative
    state and is skipped, as is a question too long for the model.
    """
    rows: dict[str, list[str]] = {c: [] for c in TRIPLET_COLUMNS}
    counts: dict[str, SourceCounts] = {}
    bar = tqdm(total=len(questions), desc="mining", unit="question", disable=not progress)
    for start in range(0, len(questions), chunk_size):
        chunk = questions[start : start + chunk_size]
        pictures: dict[str, Image.Image | None] = {}
        for q in chunk:
            if q.image not in pictures:
                pictures[q.image] = q.picture()
        probes = [Probe(q.prompt, q.answer, pictures[q.image]) for q in chunk]
        for q, answer in zip(chunk, _greedy_answers(vlm, probes), strict=True):
            c = counts.setdefault(q.source, SourceCounts())
            c.asked += 1
            if answer is None:
                c.skip("prompt too long for the model")
                continue
            if exact_match(answer, q.answer):
                c.right += 1
                continue
            c.wrong += 1
            if not answer:
                c.skip("empty wrong answer")
                continue
            c.kept += 1
            if q.rendered:
                path = Path(q.image)
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # optimize=False and no metadata, as the world's writers: bytes depend on pixels only.
                    pictures[q.image].save(path, "PNG", optimize=False)
            for column, value in zip(
                TRIPLET_COLUMNS, (q.key, q.prompt, q.image, q.answer, answer, q.source, q.fact), strict=True
            ):
                rows[column].append(value)
        bar.update(len(chunk))
    bar.close()
    return rows, counts


def _gather(
    out: Path, withheld: WithheldSource | None, annotations: Sequence[AnnotationSource]
) -> tuple[list[Question], list[dict[str, Any]], dict[str, SourceCounts]]:
    questions: list[Question] = []
    described: list[dict[str, Any]] = []
    loader_skips: dict[str, SourceCounts] = {}
    if withheld is not None:
        qs, desc = withheld.questions(out / IMAGES_DIR)
        questions += qs
        described.append(desc)
    for source in annotations:
        qs, desc, skipped = source.questions()
        questions += qs
        described.append(desc)
        if skipped:
            counts = loader_skips.setdefault(Path(source.file).name, SourceCounts())
            for reason, n in skipped.items():
                counts.skip(reason, n)
    if not questions:
        raise KnowledgeOptionError("knowledge.mine: no questions; give `withheld` and/or `annotations`")
    return questions, described, loader_skips


def _print_counts(counts: dict[str, Any]) -> None:
    total = SourceCounts()
    for source, c in counts.items():
        c = c if isinstance(c, SourceCounts) else SourceCounts(**c)
        print(f"  {source}: {c.line()}", flush=True)
        total.add(c)
    print(f"mining: {total.line()}", flush=True)


def run(
    backbone: VLM,
    out: str,
    withheld: WithheldSource | None = None,
    annotations: list[AnnotationSource] | None = None,
    layers: list[int] | None = None,
    stage: Literal["all", "mine", "states"] = "all",
    chunk_size: int = 2048,
    limit: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mine triplets and extract their states into the knowledge folder `out`.

    Args:
        backbone: the model whose knowledge gaps are mined (any `VLM`, `class_path`/`init_args`).
        out: the knowledge folder (triplets/, states/, images/; kept out of git by its .gitignore).
        withheld: the world's withheld facts on pool renderings (world backbones).
        annotations: benchmark training files whose edit questions are asked (any backbone).
        layers: language layers whose pre-attention states are kept (default the last four).
        stage: `all`, or only `mine` or `states`.
        chunk_size: questions per progress step (the backbone batches them by its `max_batch_size`).
        limit: ask only the first `limit` questions (quick runs; part of the cache key).
        overwrite: replace a folder made with another backbone or other settings instead of refusing.
        threads: torch intra-op threads (None: torch's default).
        progress: show progress bars.

    Returns what was done: counts, sizes, seconds per stage, folders.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if chunk_size < 1 or (limit is not None and limit < 1):
        raise KnowledgeOptionError(f"chunk_size and limit must be >= 1, got {chunk_size} and {limit}")
    layers = [-4, -3, -2, -1] if layers is None else list(layers)
    folder = Path(out)
    ignore_in_git(folder)
    vlm = backbone
    vlm.model.eval()
    bkey = backbone_key(vlm)
    summary: dict[str, Any] = {"out": str(folder)}
    if stage in ("all", "mine"):
        summary["mine"] = _mine_stage(
            vlm, bkey, folder, withheld, annotations or [], limit, chunk_size, overwrite, progress
        )
    if stage in ("all", "states"):
        summary["states"] = _states_stage(vlm, bkey, folder, layers, chunk_size, overwrite, progress)
    return summary


def _mine_stage(
    vlm: VLM,
    bkey: dict[str, Any],
    folder: Path,
    withheld: WithheldSource | None,
    annotations: Sequence[AnnotationSource],
    limit: int | None,
    chunk_size: int,
    overwrite: bool,
    progress: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    questions, described, counts = _gather(folder, withheld, annotations)
    if limit is not None:
        questions = questions[:limit]
    settings = {
        "sources": described,
        "limit": limit,
        # What decides a greedy answer's text besides the weights.
        "prompt_format": vlm.prompt_format,
        "image_text": vlm.image_text,
        "answer_prefix": vlm.answer_prefix,
        "max_new_tokens": vlm.max_new_tokens,
        "miner_version": MINER_VERSION,
    }
    key = {"what": "triplets", "backbone": bkey, "settings": settings}
    target = folder / TRIPLETS_DIR
    if check_reusable(target, key, "triplets", overwrite):
        _, stored, _ = load_checked(target, TRIPLETS_DIR, TRIPLET_COLUMNS, "triplets")
        print(f"triplets: {target} is up to date ({stored['n_triplets']:,} triplets), reused", flush=True)
        _print_counts(stored["counts"])
        return {
            "reused": True,
            "n_triplets": stored["n_triplets"],
            "counts": stored["counts"],
            "seconds": 0.0,
        }
    if overwrite and (folder / IMAGES_DIR).exists() and withheld is not None:
        # Renderings of an older mining run must not survive next to the new triplets.
        shutil.rmtree(folder / IMAGES_DIR)
    print(f"mining: {len(questions):,} questions from {len(described)} source(s) into {target}", flush=True)
    rows, mined = mine_triplets(vlm, questions, chunk_size, progress)
    for source, c in mined.items():
        counts.setdefault(source, SourceCounts()).add(c)
    n = len(rows["key"])
    seconds = time.perf_counter() - start
    stored_counts = {s: asdict(c) for s, c in counts.items()}
    save_dataset(
        target,
        datasets.Dataset.from_dict(rows),
        {**key, "n_triplets": n, "counts": stored_counts, "seconds": round(seconds, 1)},
    )
    _print_counts(counts)
    print(f"triplets: {n:,} written to {target} in {seconds:.1f}s", flush=True)
    return {"reused": False, "n_triplets": n, "counts": stored_counts, "seconds": seconds}


def _states_stage(
    vlm: VLM,
    bkey: dict[str, Any],
    folder: Path,
    layers: list[int],
    chunk_size: int,
    overwrite: bool,
    progress: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    triplets, tkey, tfolder = load_checked(folder, TRIPLETS_DIR, TRIPLET_COLUMNS, "triplets")
    differ = key_differences({"backbone": tkey.get("backbone")}, {"backbone": bkey})
    if differ:
        raise KnowledgeStoreError(
            f"triplets {tfolder} were mined with another backbone (differs in {', '.join(differ)}); "
            "their wrong answers are not this backbone's: mine again into another --out"
        )
    key = {
        "what": "states",
        "backbone": bkey,
        "layers": layers,
        "hook": "pre-attention hidden_states (after the input norm)",
        "triplets": digest({k: v for k, v in tkey.items() if k != "seconds"}),
        "states_version": STATES_VERSION,
    }
    target = folder / STATES_DIR
    if check_reusable(target, key, "knowledge states", overwrite):
        print(
            f"states: {target} is up to date ({len(triplets):,} triplets, layers {layers}), reused",
            flush=True,
        )
        return {"reused": True, "n": len(triplets), "seconds": 0.0}
    columns = extract_triplet_states(vlm, triplets, layers, chunk_size, progress)
    dataset = states_dataset(triplets["key"], triplets["fact"], columns)
    seconds = time.perf_counter() - start
    save_dataset(target, dataset, {**key, "n": len(triplets), "seconds": round(seconds, 1)})
    hidden = next(iter(columns.values())).shape[1] if columns else 0
    print(
        f"states: {len(triplets):,} triplets x {len(layers)} layers x (sem, pos, neg) x {hidden} floats "
        f"written to {target} in {seconds:.1f}s",
        flush=True,
    )
    return {"reused": False, "n": len(triplets), "seconds": seconds}


#: What ends the command with one line instead of a traceback: the user's data, folders and options.
USER_ERRORS = (KnowledgeStoreError, BadRecordError, ImageLoadError, PromptTooLongError, FileNotFoundError)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m knowledge.mine", description=__doc__.splitlines()[0], exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options below")
    parser.add_function_arguments(run)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
        init = parser.instantiate(cfg)
        options = {k: v for k, v in init.items() if k != "config"}
        datasets.disable_progress_bars()
        return run(**options)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
