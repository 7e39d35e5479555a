"""The `lifelong` block of a lifelong run's summary.json: scores per checkpoint K and per gap g.

Built from the per-case records (each holds its scores at every checkpoint that covered it and
after every gap, `lightning_modules/lifelong.py`) with the same per-case aggregation as the run's
headline scores (`metrics.scores.ScoreSet`), so the row at K = N equals the headline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callbacks.score_fields import score_fields
from metrics.scores import ScoreSet, average


def _scores_of(score_dicts: Sequence[dict[str, float]], max_hops: int) -> dict[str, Any]:
    scores = ScoreSet(max_hops=max_hops)
    for values in score_dicts:
        scores.update_case(values)
    computed = scores.compute() if score_dicts else {}
    computed["avg"] = average(computed)
    return score_fields(computed, max_hops)


def lifelong_summary(records: Sequence[dict[str, Any]], max_hops: int, timing: Any = None) -> dict[str, Any]:
    """Per checkpoint and per gap: the six scores (percent), their twins, and how many cases they cover.

    `timing` (`LifelongTiming`, when this process ran the sequence): cumulative edit seconds at each
    checkpoint and the seconds spent scoring.
    """
    entries = [r["lifelong"] for r in records if "lifelong" in r]
    ks = sorted({int(k) for e in entries for k in e["checkpoints"]})
    gaps = sorted({int(g) for e in entries for g in e["gaps"]})
    checkpoints = {}
    for k in ks:
        covered = [e["checkpoints"][str(k)] for e in entries if str(k) in e["checkpoints"]]
        checkpoints[str(k)] = {"n_cases": len(covered), **_scores_of(covered, max_hops)}
        if timing is not None and k in timing.edit_seconds_at:
            checkpoints[str(k)]["edit_seconds_total"] = round(timing.edit_seconds_at[k], 3)
    by_gap = {}
    for g in gaps:
        scored = [e["gaps"][str(g)] for e in entries if str(g) in e["gaps"]]
        by_gap[str(g)] = {
            "n_cases": len(scored),
            # Cases with fewer than g edits after them, scored at the end of the sequence instead.
            "n_scored_at_end": sum(1 for s in scored if s["at_end"]),
            **_scores_of([s["scores"] for s in scored], max_hops),
        }
    out: dict[str, Any] = {"length": len(entries), "checkpoints": checkpoints, "gaps": by_gap}
    if timing is not None:
        out["edit_seconds_total"] = round(timing.edit_seconds, 3)
        out["score_seconds_total"] = round(timing.score_seconds, 3)
    return out
