"""The six editing scores (Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port) and their generation twins.

`functional` holds pure functions, `protocols` the per-probe scoring rules (strict or MMEdit-trainer),
`scores` the accumulating torchmetrics classes and `ScoreSet`.
"""

from metrics.functional import (
    IGNORE_INDEX,
    TeacherForced,
    exact_match,
    first_line,
    normalize_answer,
    teacher_forced_outputs,
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
    "IGNORE_INDEX",
    "PROTOCOLS",
    "SCORE_CLASSES",
    "CaseMeanScore",
    "ImageGenerality",
    "ImageLocality",
    "Portability",
    "Protocol",
    "Reliability",
    "ScoreSet",
    "TeacherForced",
    "TextGenerality",
    "TextLocality",
    "case_values",
    "exact_match",
    "first_line",
    "generation_score",
    "normalize_answer",
    "probe_score",
    "teacher_forced_outputs",
    "token_accuracy",
    "token_agreement",
    "topk_needed",
]
