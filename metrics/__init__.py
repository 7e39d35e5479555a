"""The six editing scores (Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port) and their generation twins.

`functional` holds pure functions, `protocols` the per-probe scoring rules (strict or MMEdit-trainer),
`scores` the accumulating torchmetrics classes and `ScoreSet`.
"""

from metrics.functional import (
    exact_match,
    first_line,
    normalize_answer,
    token_accuracy,
    token_agreement,
)
from metrics.protocols import PROTOCOLS, Protocol, generation_score, probe_score, topk_needed
from metrics.scores import (
    SCORE_CLASSES,
    CaseMeanScore,
    ImageGenerality,
    ImageLocality,
    Portability,
    Reliability,
    ScoreSet,
    TextGenerality,
    TextLocality,
    case_values,
)

__all__ = [
    "PROTOCOLS",
    "SCORE_CLASSES",
    "CaseMeanScore",
    "ImageGenerality",
    "ImageLocality",
    "Portability",
    "Protocol",
    "Reliability",
    "ScoreSet",
    "TextGenerality",
    "TextLocality",
    "case_values",
    "exact_match",
    "first_line",
    "generation_score",
    "normalize_answer",
    "probe_score",
    "token_accuracy",
    "token_agreement",
    "topk_needed",
]
