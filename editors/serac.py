"""SERAC (Mitchell et al., ICML 2022): memory-based editing with a scope classifier and a counterfactual model.

Nothing in the backbone changes. `apply` writes the edits into an explicit memory; a probe is then
answered by one of two models:

- the **scope classifier** (`editors/serac_scope.py`) scores the probe against every memory entry;
  when the best score passes `threshold` the probe is in scope of that entry,
- and the **counterfactual model** (`editors/serac_counterfactual.py`, a trained copy of the
  backbone's architecture) answers it with that entry's edit (text and picture) in its context;
- every other probe goes to the backbone, untouched, so out-of-scope answers are exactly the
  unedited model's.

`routing: image_text` (default) lets the classifier see the probe's picture as well as its text;
`routing: text` reads the text alone, as the public SERAC's distilbert classifier does, and so
sends image-locality questions that are worded like the edit (same relation, another picture) to
the counterfactual model. Both heads are trained together and live in the same checkpoint.

Training (`training_loss`, run by `EditorTraining`): loss = classifier BCE (both heads; in-scope
probes of each edit against every other probe seen so far) + the counterfactual model's answer NLL
of the in-scope probes with the edit in context (`loss_edit`) + `cf_loc_weight` x KL from the
backbone on the case's locality probes asked with the edit in context (so a probe the classifier
sends to the counterfactual model by mistake is still answered as the backbone would).

Handles: one per `apply` (one memory); `prepare` tags each probe with its handle's memory, and one
router per editor and backbone answers the tagged probes of every live handle in shared batched
passes (`side_by_side`): one-step cases of a batch are scored together although each has its own
memory. `extend` (lifelong editing) makes a handle with the live memory plus the new edits, whose
classifier features are the only ones computed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from backbones.base import VLM
from backbones.batching import TeacherForced
from core.case import PROBE_KINDS, ContextItem, EditCase, Probe
from editors.base import EditHandle
from editors.routing import RoutedAnswerer
from editors.serac_counterfactual import (
    ContextFormat,
    CounterfactualAnswerer,
    answer_log_probs,
    build_counterfactual,
    kl_to_reference,
)
from editors.serac_scope import (
    ROUTINGS,
    Routing,
    ScopeClassifier,
    ScopeFeatures,
    balanced_bce,
    scope_features,
    scope_labels,
)
from editors.trainable import TrainableEditor

#: Probe kinds the classifier and the counterfactual model learn as in scope, by default.
IN_SCOPE_KINDS: tuple[str, ...] = ("rel", "t_gen", "i_gen", "port")
#: Locality kinds the counterfactual model learns to answer as the backbone does.
LOCALITY_KINDS: tuple[str, ...] = ("t_loc", "i_loc")
#: The public recipe's negatives for the text-only head: text locality questions only (the public
#: classifier never sees image-locality questions, nor other edits' questions, as negatives).
TEXT_HEAD_NEGATIVES: tuple[str, ...] = ("t_loc",)


# ----------------------------------------------------------------- memory
@dataclass
class MemoryEntry:
    """One remembered edit: where it came from, the edit itself and the context line it becomes."""

    case_id: str
    edit: Probe
    fact: ContextItem


@dataclass
class Decision:
    """Where one probe goes: the matched entry (None: the backbone answers) and the best score."""

    probe: Probe  # kept so that the id() the decision is filed under cannot be reused while it lives
    entry: int | None
    score: float


class EditMemory:
    """The edits of one `apply` call, their classifier features, and the routing decisions taken so far."""

    def __init__(self, entries: list[MemoryEntry], features: ScopeFeatures, routing: str) -> None:
        self.entries = entries
        self.features = features
        self.routing = routing
        self.decisions: dict[int, Decision] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.decisions.clear()


@dataclass(frozen=True)
class MemoryProbe(Probe):
    """A probe tagged with the memory it is asked against (what `SeracHandle.prepare` returns).

    Any copy made with `dataclasses.replace` (as `with_context` does) keeps the tag.
    """

    memory: EditMemory | None = field(default=None, compare=False, repr=False)

    @classmethod
    def tag(cls, probe: Probe, memory: EditMemory) -> MemoryProbe:
        return cls(**{f.name: getattr(probe, f.name) for f in fields(Probe)}, memory=memory)


def _memory_of(probe: Probe) -> EditMemory:
    memory = getattr(probe, "memory", None)
    if memory is None:
        raise TypeError(
            "SERAC's router answers probes prepared by a SERAC handle: pass them through "
            "handle.prepare(probes) first (edit_and_score does)"
        )
    return memory


# ----------------------------------------------------------------- answering
class SeracRouter(RoutedAnswerer):
    """Routes tagged probes against their own memories; in-scope ones go to the counterfactual model.

    One per editor and backbone, shared by every live handle, so the probes of many one-step edits
    are answered in the same batched passes: one classifier pass over all new probes, one
    counterfactual call for the in-scope ones, one backbone call for the rest.
    """

    def __init__(self, editor: SERAC, vlm: VLM) -> None:
        self.editor = editor
        self.vlm = vlm
        super().__init__(
            self._in_scope,
            CounterfactualAnswerer(editor.counterfactual, self._fact_of, editor.context_format),
            vlm,
        )

    def _in_scope(self, probe: Probe) -> bool:
        return _memory_of(probe).decisions[id(probe)].entry is not None

    def _fact_of(self, probe: Probe) -> ContextItem:
        memory = _memory_of(probe)
        entry = memory.decisions[id(probe)].entry
        assert entry is not None
        return memory.entries[entry].fact

    def decide(self, probes: Sequence[Probe]) -> list[Decision]:
        """Route every probe not routed yet (one feature pass for all of them); return their decisions."""
        todo: dict[int, tuple[EditMemory, list[Probe]]] = {}
        for p in probes:
            memory = _memory_of(p)
            if id(p) not in memory.decisions:
                todo.setdefault(id(memory), (memory, []))[1].append(p)
        for routing in ROUTINGS:
            groups = [(m, ps) for m, ps in todo.values() if m.routing == routing]
            if not groups:
                continue
            flat = [p for _, ps in groups for p in ps]
            feats = scope_features(self.vlm, flat, routing, self.editor.feature_layer)
            offset = 0
            for memory, ps in groups:
                queries = feats.select(range(offset, offset + len(ps)))
                offset += len(ps)
                if not len(memory):
                    for p in ps:
                        memory.decisions[id(p)] = Decision(p, None, 0.0)
                    continue
                with torch.no_grad(), torch.inference_mode(False):
                    scores = self.editor.scope(routing, memory.features, queries).sigmoid().cpu()
                best, entry = scores.max(0)
                for p, b, e in zip(ps, best.tolist(), entry.tolist(), strict=True):
                    chosen = e if b > self.editor.threshold else None
                    memory.decisions[id(p)] = Decision(p, chosen, b)
        return [_memory_of(p).decisions[id(p)] for p in probes]

    def teacher_forced(self, probes: Sequence[Probe], all_topk: int = 0) -> list[TeacherForced]:
        self.decide(probes)
        return super().teacher_forced(probes, all_topk)

    def generate(
        self, probes: Sequence[Probe], teacher_forced: Sequence[TeacherForced] | None = None
    ) -> list[str]:
        self.decide(probes)
        return super().generate(probes, teacher_forced)


class SeracHandle(EditHandle):
    """One memory of edits. The backbone is never touched, so `restore` only forgets the decisions."""

    def __init__(self, editor: SERAC, memory: EditMemory, stats: dict[str, object]) -> None:
        super().__init__(stats)
        self.editor = editor
        self.memory = memory

    def prepare(self, probes: Sequence[Probe]) -> list[Probe]:
        return [MemoryProbe.tag(p, self.memory) for p in probes]

    def answerer(self, vlm: VLM) -> SeracRouter:
        return self.editor.router(vlm)

    def restore(self) -> None:
        self.memory.clear()


# ----------------------------------------------------------------- the editor
class SERAC(TrainableEditor):
    """Semi-parametric editing with a retrieval-augmented counterfactual model.

    Args:
        routing: `image_text` (the classifier sees the probe's picture and text) or `text` (text
            only, as the public SERAC).
        threshold: a probe is in scope of its best-scoring memory entry when the classifier's
            probability exceeds this (0.5 in the paper).
        feature_layer: the backbone language layer whose pooled outputs the classifier reads.
        proj_dim: width of the classifier's learned projection per modality.
        hidden: width of the classifier's pair MLP.
        cls_lr_gain: the classifier learns this many times faster than the editor's learning rate
            (it starts from scratch; the counterfactual model only fine-tunes).
        hard_negatives: per edit, the BCE of this many highest-scoring out-of-scope probes is a
            loss term of its own (0: none), so the rare hard negatives are not averaged away.
        in_scope_kinds: probe kinds that are in the scope of their case's edit in training
            (portability is used where the training data has it).
        cf_trainable: parameter groups of the counterfactual model that are trained (the rest of
            the copy stays at the backbone's weights, and is still saved in the checkpoint).
        cf_layers: keep only the first N language layers of the counterfactual model (None: all).
        fact_format: the edit as a context line for the counterfactual model; `{prompt}`, `{target}`.
        query_format: the probe's question after it; `{prompt}`.
        fact_image: the context line carries the edit's picture.
        cls_weight: weight of the classifier loss.
        cf_loc_weight: weight of the counterfactual model's KL from the backbone on locality probes
            asked with the edit in context (0: in-scope NLL only, as the paper).
        cf_swap: share of training edits whose target is replaced by another training edit's
            target (same prompt preferred), so the counterfactual model learns to read the new
            answer from its context rather than memorise the training edits.
        bank_size: at most this many training probes are kept (as frozen features) as the
            classifier's negatives; older cases are dropped first.
        name: recorded in results.
        checkpoint: a trained editor checkpoint (see `TrainableEditor`).
    """

    name = "serac"
    side_by_side = True

    def __init__(
        self,
        routing: Routing = "image_text",
        threshold: float = 0.5,
        feature_layer: int = -1,
        proj_dim: int = 64,
        hidden: int = 32,
        cls_lr_gain: float = 3.0,
        hard_negatives: int = 16,
        in_scope_kinds: list[str] | None = None,
        cf_trainable: list[str] | None = None,
        cf_layers: int | None = None,
        fact_format: str = "New Fact: {prompt} {target}",
        query_format: str = "Prompt: {prompt}",
        fact_image: bool = True,
        cls_weight: float = 1.0,
        cf_loc_weight: float = 0.5,
        cf_swap: float = 0.75,
        bank_size: int = 8192,
        name: str = "serac",
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        if routing not in ROUTINGS:
            raise ValueError(f"SERAC: routing must be one of {ROUTINGS}, got {routing!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SERAC: threshold must be in (0, 1), got {threshold}")
        if cls_weight < 0 or cf_loc_weight < 0:
            raise ValueError("SERAC: cls_weight and cf_loc_weight must be >= 0")
        if not 0.0 <= cf_swap <= 1.0:
            raise ValueError(f"SERAC: cf_swap must be in [0, 1], got {cf_swap}")
        if bank_size < 1:
            raise ValueError(f"SERAC: bank_size must be >= 1, got {bank_size}")
        if hard_negatives < 0:
            raise ValueError(f"SERAC: hard_negatives must be >= 0, got {hard_negatives}")
        unknown = sorted(set(in_scope_kinds or ()) - set(PROBE_KINDS))
        if unknown:
            raise ValueError(f"SERAC: in_scope_kinds {unknown} are not probe kinds {list(PROBE_KINDS)}")
        self.routing = routing
        self.threshold = threshold
        self.feature_layer = feature_layer
        self.proj_dim = proj_dim
        self.hidden = hidden
        self.cls_lr_gain = cls_lr_gain
        self.hard_negatives = hard_negatives
        self.in_scope_kinds = tuple(in_scope_kinds if in_scope_kinds is not None else IN_SCOPE_KINDS)
        self.cf_trainable = list(
            cf_trainable if cf_trainable is not None else ["projector", "language", "lm_head"]
        )
        self.cf_layers = cf_layers
        self.context_format = ContextFormat(fact_format, query_format, fact_image)
        self.cls_weight = cls_weight
        self.cf_loc_weight = cf_loc_weight
        self.cf_swap = cf_swap
        self.bank_size = bank_size
        self.name = name
        self._router: SeracRouter | None = None
        # Training caches of what the frozen backbone says about each training case (it never
        # changes): classifier features per routing mode and the locality probes' log-probabilities.
        self._bank: OrderedDict[str, _CaseFeatures] = OrderedDict()
        self._reference: dict[str, list[torch.Tensor]] = {}

    # ----------------------------------------------------------------- contract
    def attached_groups(self) -> list[str]:
        # The counterfactual model copies the whole backbone and the classifier reads its language
        # layers. The fingerprint already names the model class, width, depth and vocabulary; the
        # projector's and output head's shapes add the vision width. (Listing every group would
        # make a refusal name hundreds of parameters; a vision tower of another depth is still
        # refused, by the strict load, in one line.)
        return ["projector", "lm_head"]

    def build(self, vlm: VLM) -> None:
        self.counterfactual = build_counterfactual(vlm, self.cf_trainable, self.cf_layers)
        self.scope = ScopeClassifier(
            _feature_dim(vlm, self.feature_layer), self.proj_dim, self.hidden, self.cls_lr_gain
        ).to(vlm.device)
        self._router = None
        self._bank.clear()
        self._reference.clear()

    def describe(self) -> dict[str, object]:
        fmt = self.context_format
        return {
            **super().describe(),
            "routing": self.routing,
            "threshold": self.threshold,
            "feature_layer": self.feature_layer,
            "proj_dim": self.proj_dim,
            "hidden": self.hidden,
            "cls_lr_gain": self.cls_lr_gain,
            "hard_negatives": self.hard_negatives,
            "in_scope_kinds": list(self.in_scope_kinds),
            "cf_trainable": self.cf_trainable,
            "cf_layers": self.cf_layers,
            "fact_format": fmt.fact_format,
            "query_format": fmt.query_format,
            "fact_image": fmt.fact_image,
            "cls_weight": self.cls_weight,
            "cf_loc_weight": self.cf_loc_weight,
            "cf_swap": self.cf_swap,
        }

    def train(self, mode: bool = True) -> SERAC:
        super().train(mode)
        # The counterfactual copy answers in training exactly as it will in tests (no dropout).
        if "counterfactual" in self._modules:
            self.counterfactual.eval()
        return self

    # ----------------------------------------------------------------- editing
    def router(self, vlm: VLM) -> SeracRouter:
        """The router shared by every handle of this editor on `vlm`."""
        router = self._router
        if router is None or router.fallback is not vlm or router.scoped.model is not self.counterfactual:
            router = self._router = SeracRouter(self, vlm)
        return router

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> SeracHandle:
        self.setup(vlm)
        start = time.perf_counter()
        entries = [
            MemoryEntry(case.case_id, edit, self.context_format.fact(edit))
            for case in cases
            for edit in case.edits
        ]
        features = scope_features(vlm, [e.edit for e in entries], self.routing, self.feature_layer)
        memory = EditMemory(entries, features, self.routing)
        stats = {"time_s": time.perf_counter() - start, "memory": len(entries), "routing": self.routing}
        return SeracHandle(self, memory, stats)

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> SeracHandle:
        """The live memory plus the edits of `cases` (their features computed once, the earlier ones kept)."""
        if not isinstance(handle, SeracHandle) or handle.editor is not self:
            handle.restore()
            raise TypeError("SERAC.extend: the handle was not made by this editor's apply")
        new = self.apply(vlm, cases)
        old = handle.memory
        parts = [f for f in (old.features, new.memory.features) if len(f)]
        features = ScopeFeatures.cat(parts) if parts else new.memory.features
        # A new memory object: decisions taken against the smaller memory must not be reused.
        memory = EditMemory(old.entries + new.memory.entries, features, self.routing)
        old.clear()
        stats = {**new.stats, "memory": len(memory.entries)}
        return SeracHandle(self, memory, stats)

    # ----------------------------------------------------------------- training
    def training_loss(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[str, torch.Tensor]:
        cases = list(cases)
        self._remember(vlm, cases)
        out: dict[str, torch.Tensor] = {}

        # The classifier: this batch's edits against every probe in the bank (this batch's own
        # probes included, so each edit meets its in-scope probes and hundreds of negatives:
        # other entities asked the same question, the same entity asked another one, locality).
        bank = list(self._bank.values())
        query_cases = [c.case_id for c in bank for _ in c.kinds]
        query_kinds = [k for c in bank for k in c.kinds]
        key_cases = [c.case_id for c in cases]
        cls_total = torch.zeros((), device=vlm.device)
        for routing in ROUTINGS:
            keys = ScopeFeatures.cat([self._bank[c.case_id].edit[routing] for c in cases])
            queries = ScopeFeatures.cat([c.probes[routing] for c in bank])
            logits = self.scope(routing, keys, queries)
            negatives = None if routing == "image_text" else TEXT_HEAD_NEGATIVES
            labels, weight = scope_labels(key_cases, query_cases, query_kinds, self.in_scope_kinds, negatives)
            terms = balanced_bce(
                logits, labels.to(logits.device), weight.to(logits.device), self.hard_negatives
            )
            cls_total = cls_total + terms["loss"]
            suffix = "" if routing == self.routing else f"_{routing}"
            out[f"loss_cls{suffix}"] = terms["loss"]
            out[f"cls_acc{suffix}"] = terms["acc"]
            out[f"cls_precision{suffix}"] = terms["precision"]
            out[f"cls_recall{suffix}"] = terms["recall"]
            if routing == self.routing:
                out["loss_loc"] = terms["neg"]

        # The counterfactual model: in-scope answers with the edit in context, and locality probes
        # answered as the backbone answers them although an edit is in context.
        fmt = self.context_format
        inside, loc_rows, loc_reference = [], [], []
        for case in cases:
            probes = _in_scope_probes(case, self.in_scope_kinds)
            target = self._swapped_target(case)
            if target is not None:
                # Portability answers follow from the original target, not from a swapped one.
                probes = [replace(p, answer=target) for p in probes if p.kind != "port"]
            fact = fmt.fact(replace(case.edit, answer=target) if target is not None else case.edit)
            inside += [fmt.ask(p, fact) for p in probes]
            if self.cf_loc_weight > 0:
                loc = [p for k in LOCALITY_KINDS for p in case.probes.get(k, [])]
                loc_rows += [fmt.ask(p, fact) for p in loc]
                loc_reference += self._reference[case.case_id]
        loss_edit = self.counterfactual.loss(inside)
        loss = loss_edit + self.cls_weight * cls_total
        if loc_rows:
            loss_cf_loc = kl_to_reference(self.counterfactual, loc_rows, loc_reference)
            loss = loss + self.cf_loc_weight * loss_cf_loc
            out["loss_cf_loc"] = loss_cf_loc
        out["loss_edit"] = loss_edit
        out["loss"] = loss
        return out

    def _swapped_target(self, case: EditCase) -> str | None:
        """With probability `cf_swap`, another training edit's target for this case (else None).

        Without it the counterfactual model can lower its loss by memorising each training entity's
        new answer instead of reading it from the context, which does not carry over to new edits.
        Targets of edits asked with the same prompt are preferred (an answer of the right type),
        drawn uniformly over the distinct targets.
        """
        if self.cf_swap <= 0 or float(torch.rand(())) >= self.cf_swap:
            return None
        others = {c.target for c in self._bank.values() if c.target != case.edit.answer}
        same = {c.target for c in self._bank.values() if c.prompt == case.edit.prompt} & others
        # Uniform over distinct answers, not over edits: rare answers are the ones it copies worst.
        pool = sorted(same or others)
        if not pool:
            return None
        return pool[int(torch.randint(len(pool), ()))]

    def _remember(self, vlm: VLM, cases: Sequence[EditCase]) -> None:
        """Put the frozen backbone's features (and locality log-probabilities) of new cases in the bank."""
        new = [c for c in cases if c.case_id not in self._bank]
        for case in cases:
            if case.case_id in self._bank:
                self._bank.move_to_end(case.case_id)  # recently seen cases are evicted last
        if not new:
            return
        edits = [c.edit for c in new]
        probes = [p for c in new for p in c.all_probes()]
        per_routing = {r: scope_features(vlm, edits + probes, r, self.feature_layer) for r in ROUTINGS}
        offset = len(edits)
        for i, case in enumerate(new):
            n = len(case.all_probes())
            self._bank[case.case_id] = _CaseFeatures(
                case.case_id,
                case.edit.prompt,
                case.edit.answer,
                [p.kind for p in case.all_probes()],
                {r: f.select([i]) for r, f in per_routing.items()},
                {r: f.select(range(offset, offset + n)) for r, f in per_routing.items()},
            )
            offset += n
        while sum(len(c.kinds) for c in self._bank.values()) > self.bank_size and len(self._bank) > len(
            cases
        ):
            dropped, _ = self._bank.popitem(last=False)
            self._reference.pop(dropped, None)
        if self.cf_loc_weight > 0:
            loc = [p for c in new for k in LOCALITY_KINDS for p in c.probes.get(k, [])]
            reference: Iterator[torch.Tensor] = iter(())
            if loc:
                with torch.no_grad():
                    batch = vlm.build_batch(loc)
                    reference = iter([r.cpu() for r in answer_log_probs(vlm.logits(batch), batch)])
            for case in new:
                n = sum(len(case.probes.get(k, [])) for k in LOCALITY_KINDS)
                self._reference[case.case_id] = [next(reference) for _ in range(n)]

    # ----------------------------------------------------------------- reporting
    @torch.no_grad()
    def scope_decisions(
        self, vlm: VLM, memory_cases: Sequence[EditCase], probes: Sequence[Probe]
    ) -> list[Decision]:
        """How `probes` would be routed against a memory holding the edits of `memory_cases`."""
        handle = self.apply(vlm, memory_cases)
        try:
            return self.router(vlm).decide(handle.prepare(probes))
        finally:
            handle.restore()


@dataclass
class _CaseFeatures:
    """A training case's frozen classifier features, per routing mode: its edit and all its probes."""

    case_id: str
    prompt: str
    target: str
    kinds: list[str]
    edit: dict[str, ScopeFeatures]
    probes: dict[str, ScopeFeatures]


def _in_scope_probes(case: EditCase, kinds: Sequence[str]) -> list[Probe]:
    """The case's edits and in-scope probes, each object once (the edit is also the first Rel probe)."""
    seen: dict[int, Probe] = {}
    for p in [*case.edits, *(p for k in kinds for p in case.probes.get(k, []))]:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _feature_dim(vlm: VLM, layer: int) -> int:
    """Width of the pooled states the classifier reads (one tiny forward where the config names none)."""
    width = getattr(vlm.text_config(), "hidden_size", None)
    if isinstance(width, int) and width > 0:
        return width
    return int(scope_features(vlm, [Probe("x", "")], "text", layer).values["text"].shape[-1])
