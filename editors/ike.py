"""IKE: in-context knowledge editing. No weight changes; the edit lives in the prompt.

`apply` stores, per edited case, its new fact(s) (text + edit image) and the k demonstrations
retrieved for it; `handle.prepare(probes)` prepends them to each probe. Retrieval is by cosine
similarity of `vlm.embed` vectors (the backbone's own mean-pooled last-layer states over prompt and
image), so a record is found by what its picture shows as well as by its wording.

Sequential editing with K cases: each probe is given the context of the ONE case whose edit is
most similar to the probe (by the same embedding), not all K facts with all their images at once;
K images per probe would grow every prompt by K * 576 tokens on LLaVA and drown the relevant fact.
`extend` adds cases to a live handle (their contexts and fact keys appended), as if they had been
in the first `apply` call.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch.nn import functional as F

from backbones.base import VLM
from core.case import ContextItem, EditCase, Probe
from editors.base import EditHandle, Editor
from editors.ike_pool import DemoFormats, Demonstration, build_pool, retrieval_key
from editors.training_split import ReadsTrainingSplit, split_option_problems


class IKE(ReadsTrainingSplit, Editor):
    """In-context editing with copy / update / retain demonstrations retrieved from a training split.

    Args:
        train_file: annotation file of the training split the demonstrations come from.
        image_root: folder the records' image paths are relative to.
        format: dataset format for the loader ("auto" detects it).
        k: demonstrations per edit (the paper uses 32; 0 shows the new fact alone).
        demo_images: demonstrations carry their own images (False: text-only, as the public code).
        prompt_template: template the loader applies to prompts, e.g. "Question: {} Short answer:".
        fact_format: how the new fact is written; fields {prompt}, {target}.
        query_format: how the probe's own prompt is written after the context; field {prompt}.
        demo_format: how one demonstration is written; fields {prompt}, {target}, {query}, {answer}.
        max_records: use only the first N training records for the pool (None: all).
        on_bad_record: the loader's policy for malformed training records: "error" or "skip"
            (skipped records are counted by the loader, never dropped silently).
        name: recorded in results.

    Build from in-memory cases instead of a file with `IKE.from_cases(cases, k=...)`.
    """

    side_by_side = True

    def __init__(
        self,
        train_file: str | None = None,
        image_root: str = "",
        format: str = "auto",
        k: int = 4,
        demo_images: bool = True,
        prompt_template: str | None = None,
        fact_format: str = "New Fact: {prompt} {target}",
        query_format: str = "Prompt: {prompt}",
        demo_format: str = "New Fact: {prompt} {target}\nPrompt: {query} {answer}",
        max_records: int | None = None,
        on_bad_record: str = "error",
        name: str = "IKE",
    ) -> None:
        if k < 0:
            raise ValueError(f"IKE: k must be >= 0, got {k}")
        problems = split_option_problems(max_records, on_bad_record)
        if problems:
            raise ValueError("IKE: " + "; ".join(problems))
        self.train_file = train_file
        self.image_root = image_root
        self.format = format
        self.k = k
        self.demo_images = demo_images
        self.prompt_template = prompt_template
        self.formats = DemoFormats(fact_format, query_format, demo_format)
        self.max_records = max_records
        self.on_bad_record = on_bad_record
        self.name = name
        self._demos: list[list[Demonstration]] = []
        self._record_ids: list[str] = []
        self._keys: torch.Tensor | None = None
        self._embedded_by: weakref.ref[VLM] | None = None

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "train_file": self.train_file,
            "k": self.k,
            "demo_images": self.demo_images,
            "prompt_template": self.prompt_template,
            "fact_format": self.formats.fact_format,
            "query_format": self.formats.query_format,
            "demo_format": self.formats.demo_format,
            "pool_records": len(self._demos),
        }

    # ----------------------------------------------------------------- pool
    def _load_pool_cases(self) -> list[EditCase]:
        return self.read_split(
            self.train_file, "train_file", "the training split to draw demonstrations from"
        )

    def setup(self, vlm: VLM) -> None:
        """Build the pool and embed its records once per backbone (IKE never changes the weights)."""
        if self._embedded_by is not None and self._embedded_by() is vlm:
            return
        cases = self._load_pool_cases()
        self._demos, keys = build_pool(cases, self.formats, self.demo_images)
        self._record_ids = [c.case_id for c in cases]
        if self.k > 0 and not cases:
            source = self.train_file or "from_cases"
            raise ValueError(
                f"IKE: the training pool ({source}) holds no records; "
                f"k={self.k} demonstrations cannot be drawn (set k: 0 to show the new fact alone)"
            )
        self._keys = F.normalize(vlm.embed(keys), dim=-1) if keys else torch.zeros(0, 1)
        self._embedded_by = weakref.ref(vlm)

    def retrieve(self, query: torch.Tensor) -> list[Demonstration]:
        """The k demonstrations for a normalised query vector, least similar first.

        Records are ranked by cosine and taken whole (copy, update, retain) until k are chosen; the
        most similar record ends up next to the new fact, as in IKE.
        """
        if self.k == 0 or self._keys is None or not len(self._keys):
            return []
        order = torch.argsort(self._keys @ query, descending=True, stable=True).tolist()
        groups: list[list[Demonstration]] = []
        left = self.k
        for record in order:
            if left == 0:
                break
            take = self._demos[record][:left]
            groups.append(take)
            left -= len(take)
        return [demo for group in reversed(groups) for demo in group]

    # ----------------------------------------------------------------- editing
    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> InContextHandle:
        self.setup(vlm)
        start = time.perf_counter()
        facts = F.normalize(vlm.embed([retrieval_key(c.edit) for c in cases]), dim=-1) if cases else None
        contexts: list[tuple[ContextItem, ...]] = []
        retrieved: list[list[dict[str, str]]] = []
        for i, case in enumerate(cases):
            demos = self.retrieve(facts[i])
            new_facts = tuple(ContextItem(self.formats.fact(edit), edit.image) for edit in case.edits)
            contexts.append(tuple(d.item for d in demos) + new_facts)
            retrieved.append([{"record": self._record_ids[d.record], "kind": d.kind} for d in demos])
        stats: dict[str, object] = {"time_s": time.perf_counter() - start, "retrieved": retrieved}
        return InContextHandle(vlm, self.formats, [c.case_id for c in cases], contexts, facts, stats)

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> InContextHandle:
        """The live contexts plus those of `cases` (retrieval per case does not depend on the others)."""
        if not isinstance(handle, InContextHandle):
            handle.restore()
            raise TypeError("IKE.extend: the handle was not made by IKE.apply")
        new = self.apply(vlm, cases)
        return handle.joined(new)


class InContextHandle(EditHandle):
    """The contexts of the edited cases; `prepare` gives each probe its nearest case's context.

    Nothing in the model changes, so `restore` has nothing to undo.
    """

    def __init__(
        self,
        vlm: VLM,
        formats: DemoFormats,
        case_ids: list[str],
        contexts: list[tuple[ContextItem, ...]],
        fact_keys: torch.Tensor | None,
        stats: dict[str, object],
    ) -> None:
        super().__init__(stats)
        self.vlm = vlm
        self.formats = formats
        self.case_ids = case_ids
        self.contexts = contexts
        self.fact_keys = fact_keys

    def joined(self, new: InContextHandle) -> InContextHandle:
        """One handle holding this handle's edited cases, then `new`'s."""
        if self.fact_keys is None or new.fact_keys is None:
            keys = self.fact_keys if new.fact_keys is None else new.fact_keys
        else:
            keys = torch.cat([self.fact_keys, new.fact_keys])
        stats: dict[str, object] = {
            "time_s": float(self.stats.get("time_s", 0.0)) + float(new.stats.get("time_s", 0.0)),  # type: ignore[arg-type]
            "retrieved": [*self.stats.get("retrieved", []), *new.stats.get("retrieved", [])],  # type: ignore[misc]
        }
        return InContextHandle(
            self.vlm, self.formats, self.case_ids + new.case_ids, self.contexts + new.contexts, keys, stats
        )

    def assign(self, probes: Sequence[Probe]) -> list[int]:
        """Index of the edited case whose context each probe gets (nearest edit by cosine)."""
        if len(self.contexts) <= 1 or not probes:
            # One fact needs no retrieval; skipping it saves a forward pass per case.
            return [0] * len(probes)
        queries = F.normalize(self.vlm.embed([retrieval_key(p) for p in probes]), dim=-1)
        return (queries @ self.fact_keys.T).argmax(-1).tolist()

    def prepare(self, probes: Sequence[Probe]) -> list[Probe]:
        if not self.contexts:
            return list(probes)
        choice = self.assign(probes)
        self.stats["assigned"] = [self.case_ids[i] for i in choice]
        return [
            replace(p, prompt=self.formats.query(p.prompt)).with_context(self.contexts[i])
            for p, i in zip(probes, choice, strict=True)
        ]
