"""The score keys of a summary: the six scores in percent, their average, per-hop portability, the generation twins.

Shared by the run's headline (`callbacks/summary.py`) and a lifelong run's rows per checkpoint and
gap (`callbacks/lifelong_summary.py`), so every block of summary.json reads the same way.
"""

from __future__ import annotations

import math
from typing import Any

from core.case import PROBE_KINDS


def score_fields(scores: dict[str, float], max_hops: int) -> dict[str, Any]:
    """The score keys of a summary (percent, rounded; None where no case had the probe kind)."""

    def pct(key: str) -> float | None:
        value = scores.get(key, float("nan"))
        return None if math.isnan(value) else round(value, 4)

    hops = range(1, max_hops + 1)
    out: dict[str, Any] = {key: pct(key) for key in PROBE_KINDS}
    # The mean of Rel, T-Gen, I-Gen, T-Loc, I-Loc (`metrics.scores.average`): what sweeps tune on.
    out["avg"] = pct("avg")
    out["port_per_hop"] = {str(h): pct(f"port_hop{h}") for h in hops}
    out["generation"] = {key: pct(f"gen_{key}") for key in PROBE_KINDS}
    out["generation"]["port_per_hop"] = {str(h): pct(f"gen_port_hop{h}") for h in hops}
    return out
