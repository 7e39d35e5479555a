"""IKE's demonstration pool: copy, update and retain demonstrations built from training edit cases.

Each training record gives up to three demonstrations that show the model how to use a
"New Fact": *copy* (asked the fact itself, answer the new target), *update* (asked a paraphrase,
answer the new target) and *retain* (asked something unrelated, keep its own answer). Every
demonstration carries the image of the record it came from, so a multimodal model sees the picture
each demonstration talks about. All demonstrations of one record share one retrieval key: the
record's fact (edit prompt + edit image), which is what a new edit is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.case import ContextItem, EditCase, Probe

#: IKE's demonstration kinds, in the order they are shown for one record.
DEMO_KINDS: tuple[str, ...] = ("copy", "update", "retain")


@dataclass(frozen=True)
class Demonstration:
    """One in-context example and where it came from (`record` indexes the pool's records)."""

    kind: str
    record: int
    item: ContextItem


@dataclass(frozen=True)
class DemoFormats:
    """The text layouts of IKE (the paper's `New Fact: ... Prompt: ...`)."""

    fact_format: str = "New Fact: {prompt} {target}"
    query_format: str = "Prompt: {prompt}"
    demo_format: str = "New Fact: {prompt} {target}\nPrompt: {query} {answer}"

    def __post_init__(self) -> None:
        checks = {
            "fact_format": (self.fact_format, ("{prompt}", "{target}")),
            "query_format": (self.query_format, ("{prompt}",)),
            "demo_format": (self.demo_format, ("{prompt}", "{target}", "{query}", "{answer}")),
        }
        for flag, (fmt, fields) in checks.items():
            missing = [f for f in fields if f not in fmt]
            if missing:
                raise ValueError(f"IKE {flag} {fmt!r} lacks the field(s) {', '.join(missing)}")

    def fact(self, edit: Probe) -> str:
        return self.fact_format.format(prompt=edit.prompt, target=edit.answer)

    def query(self, prompt: str) -> str:
        return self.query_format.format(prompt=prompt)

    def demo(self, edit: Probe, query: Probe, answer: str) -> str:
        return self.demo_format.format(
            prompt=edit.prompt, target=edit.answer, query=query.prompt, answer=answer
        )


def retrieval_key(probe: Probe) -> Probe:
    """The probe a fact or query is embedded as: prompt and image, no context, no answer."""
    return Probe(prompt=probe.prompt, answer="", image=probe.image, kind=probe.kind)


def record_demonstrations(
    case: EditCase, record: int, formats: DemoFormats, with_images: bool = True
) -> list[Demonstration]:
    """The copy / update / retain demonstrations of one training case (kinds it lacks are skipped).

    The retain demonstration alternates between the record's locality probes by record index, so
    a pool with both text and image locality shows the model both ways a fact can be irrelevant.
    """
    edit = case.edit
    edit_image = edit.image if with_images else None
    demos = [Demonstration("copy", record, ContextItem(formats.demo(edit, edit, edit.answer), edit_image))]
    paraphrases = case.probes.get("t_gen", [])
    if paraphrases:
        text = formats.demo(edit, paraphrases[0], edit.answer)
        demos.append(Demonstration("update", record, ContextItem(text, edit_image)))
    unrelated = case.locality_probes()
    if unrelated:
        loc = unrelated[record % len(unrelated)]
        text = formats.demo(edit, loc, loc.answer)
        demos.append(Demonstration("retain", record, ContextItem(text, loc.image if with_images else None)))
    return demos


def build_pool(
    cases: Sequence[EditCase], formats: DemoFormats, with_images: bool = True
) -> tuple[list[list[Demonstration]], list[Probe]]:
    """Per record: its demonstrations, and the probe its retrieval key is embedded from."""
    demos = [record_demonstrations(case, i, formats, with_images) for i, case in enumerate(cases)]
    keys = [retrieval_key(case.edit) for case in cases]
    return demos, keys
