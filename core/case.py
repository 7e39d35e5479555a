"""The normalised edit case every benchmark format maps into.

Nothing downstream of a loader knows which benchmark a case came from: an `EditCase` is the edit
itself plus its probes grouped by kind. A probe is (image or None, prompt, answer); portability
probes also know their hop count so results can be reported per hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

#: The probe kinds, in the order results are reported. Each kind is also the key of its score
#: (`summary.json`, `test/<kind>`, the metric names), so this is the one list of score keys.
PROBE_KINDS: tuple[str, ...] = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port")
#: How each score is written in tables and plots.
SCORE_LABELS: dict[str, str] = {
    "rel": "Rel",
    "t_gen": "T-Gen",
    "i_gen": "I-Gen",
    "t_loc": "T-Loc",
    "i_loc": "I-Loc",
    "port": "Port",
}
#: Kinds scored against the edit target (token accuracy vs. the gold answer).
ACCURACY_KINDS: tuple[str, ...] = ("rel", "t_gen", "i_gen", "port")
#: Kinds scored against the unedited model's own answers (agreement).
LOCALITY_KINDS: tuple[str, ...] = ("t_loc", "i_loc")


@dataclass(frozen=True)
class ContextItem:
    """One in-context segment placed before a probe's prompt (IKE demonstrations, new facts).

    Demonstrations carry their own image, so a multimodal in-context editor shows the model the
    picture each demonstration talks about, not only the query's picture.
    """

    text: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class Probe:
    """One question put to the model: optional image, prompt, and the answer to score.

    For locality probes `answer` is the dataset's answer; the score compares the edited model with
    the unedited one on these answer positions, so the answer text only fixes where to look.
    """

    prompt: str
    answer: str
    image: Image.Image | None = None
    kind: str = "rel"
    hop: int | None = None
    context: tuple[ContextItem, ...] = ()

    def with_context(self, items: tuple[ContextItem, ...]) -> Probe:
        return replace(self, context=tuple(items) + self.context)


@dataclass
class EditCase:
    """One benchmark record, normalised.

    `edit` is the fact to write (image, prompt, target). `extra_edits` are further facts the setting
    asks to write together with it (VLKEB's edit-one-hop-then-test). `probes` maps each kind of
    `PROBE_KINDS` to its probes; a kind may be empty when the source format has no such probe.
    """

    case_id: str
    index: int
    edit: Probe
    probes: dict[str, list[Probe]]
    extra_edits: list[Probe] = field(default_factory=list)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    #: Set when the record turned out bad only on decoding (under `on_bad_record: skip`): the
    #: file, index, id, field and message. Such a case is counted as skipped, never scored.
    skip_reason: dict[str, Any] | None = None

    @property
    def edits(self) -> list[Probe]:
        return [self.edit, *self.extra_edits]

    def all_probes(self) -> list[Probe]:
        return [p for kind in PROBE_KINDS for p in self.probes.get(kind, [])]

    def locality_probes(self) -> list[Probe]:
        return [p for kind in LOCALITY_KINDS for p in self.probes.get(kind, [])]
