"""In-context training examples for the world backbones: read a fact, then use it or ignore it.

Real instruction-tuned VLMs follow a fact given in their context (IKE's reliability is ~99% on every
backbone of VLKEB), compose it with what they know, and keep their answer when the context is about
something else. A small model trained on memorised facts alone does none of this, so a share of its
training batches are in-context ones, laid out exactly as IKE, SERAC's counterfactual model and
UniKE's vanilla ablation lay them out (`editors/ike_pool.DemoFormats`):

    [<image> New Fact: q a \\n Prompt: q' a']*   (0..4 demonstrations, each with its own image)
    <image> New Fact: q a                         (the new fact, with the fact's image or none)
    <image> Prompt: q'                            (the question, answered)

What the question is (`ContextMix`, shares of in-context examples):

- `fact`: the fact's own relation, in any training wording, on the fact's rendering or another
  rendering of the same entity: answered with the context's (counterfactual) value;
- `compose`: a composite question through the fact (1..4 hops), answered by following the
  memorised chain from the context's value;
- `other_entity_same`: the same relation about *another* entity's picture: its memorised answer.
  This is the hard negative: only the pictures tell the two apart, as in image locality;
- `other_entity`: any trained question about another entity's picture: its memorised answer;
- `same_entity_other`: another relation of the same entity: its memorised answer;
- `text`: a text-only fact: its memorised answer.

Demonstrations are IKE's three kinds built from other entities: copy (the fact asked back), update
(another wording of it) and retain (an unrelated question with its own answer and picture). Only
training wordings and training renderings appear; held-out paraphrases stay held out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields

from PIL import Image

from core.case import ContextItem, Probe
from editors.ike_pool import DemoFormats
from world.generate import Entity, World
from world.probes import composite_questions, image_questions, known_relations
from world.relations import CAPTION_TEMPLATES, EDITABLE

#: The relations an in-context fact may be about (a caption counterfactual changes its country), with
#: how often: the editable roots most, since their facts are what portability composes.
FACT_RELATIONS = {"country": 0.3, "maker": 0.3, "owner": 0.1, "material": 0.1, "caption": 0.2}


@dataclass(frozen=True)
class ContextMix:
    """What an in-context example asks, as relative weights (see the module docstring).

    Args:
        fact: the fact itself, again (answer from the context).
        compose: a composite question through the fact (answer from the context plus memory).
        other_entity_same: the fact's relation about another entity's picture (memorised answer).
        other_entity: any question about another entity's picture (memorised answer).
        same_entity_other: another relation of the fact's entity (memorised answer).
        text: a text-only fact (memorised answer).
        demonstrations: relative weights of 0, 1, 2, 3 and 4 demonstrations before the fact.
        fact_image_share: share of new facts shown with their picture (IKE always shows it).
    """

    fact: float = 0.35
    compose: float = 0.15
    other_entity_same: float = 0.15
    other_entity: float = 0.15
    same_entity_other: float = 0.1
    text: float = 0.1
    demonstrations: tuple[float, float, float, float, float] = (0.5, 0.2, 0.2, 0.1, 0.0)
    fact_image_share: float = 0.9

    def __post_init__(self) -> None:
        weights = [getattr(self, f.name) for f in fields(self) if f.name in QUESTION_KINDS]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ContextMix: question weights must be >= 0 and not all 0, got {weights}")
        if (
            len(self.demonstrations) != 5
            or any(w < 0 for w in self.demonstrations)
            or not sum(self.demonstrations)
        ):
            raise ValueError(f"ContextMix: demonstrations needs 5 weights >= 0, got {self.demonstrations}")
        if not 0 <= self.fact_image_share <= 1:
            raise ValueError(f"ContextMix: fact_image_share must lie in [0, 1], got {self.fact_image_share}")


QUESTION_KINDS = ("fact", "compose", "other_entity_same", "other_entity", "same_entity_other", "text")


class InContextExamples:
    """Draws in-context training probes from a world's true facts and made-up counterfactual ones.

    Args:
        world: the world.
        image: `image(entity, rng)` gives a training rendering of an entity.
        image_qas: per entity id, its trained (question, answer) pairs by group.
        text_qas: the trained text-only (question, answer) pairs.
        mix: what the examples ask.
    """

    def __init__(
        self,
        world: World,
        image: Callable[[Entity, random.Random], Image.Image],
        image_qas: dict[str, dict[str, list[tuple[str, str]]]],
        text_qas: list[tuple[str, str]],
        mix: ContextMix,
    ) -> None:
        self.world, self.image, self.image_qas, self.text_qas, self.mix = (
            world,
            image,
            image_qas,
            text_qas,
            mix,
        )
        self.formats = DemoFormats()
        self.kinds = QUESTION_KINDS
        self.weights = [getattr(mix, k) for k in QUESTION_KINDS]

    # ----------------------------------------------------------------- facts
    def counterfactual(self, rng: random.Random, entity: Entity) -> tuple[str, str, str, str]:
        """(relation, question, new answer, root value) of a made-up fact about `entity`."""
        relations = [r for r in FACT_RELATIONS if r not in entity.withheld]
        relation = rng.choices(relations, weights=[FACT_RELATIONS[r] for r in relations])[0]
        if relation == "caption":
            country = rng.choice([v for v in self.world.values["country"] if v != entity.facts["country"]])
            return "caption", rng.choice(CAPTION_TEMPLATES[0]), self.world.caption(entity, country), country
        value = rng.choice([v for v in self.world.values[relation] if v != entity.facts[relation]])
        return relation, rng.choice(image_questions(relation)), value, value

    def other(self, rng: random.Random, entity: Entity) -> Entity:
        while True:
            other = rng.choice(self.world.entities)
            if other.id != entity.id:
                return other

    # ----------------------------------------------------------------- questions
    def question(
        self,
        rng: random.Random,
        kind: str,
        entity: Entity,
        relation: str,
        new: str,
        root: str,
        fact_image: Image.Image | None = None,
    ) -> Probe | None:
        """The question of one example, answered; None when `kind` has nothing to ask about this fact.

        The fact asked again shows the fact's own picture half the time (T-Gen asks on the edit
        image) and another rendering of the entity otherwise (I-Gen).
        """
        world = self.world
        if kind == "fact":
            wording = rng.choice(CAPTION_TEMPLATES[0] if relation == "caption" else image_questions(relation))
            own = fact_image is not None and rng.random() < 0.5
            return Probe(wording, new, fact_image if own else self.image(entity, rng))
        if kind == "compose":
            if relation not in EDITABLE and relation != "caption":
                return None
            root_relation = "country" if relation == "caption" else relation
            options = [
                (q, a)
                for q, a, r, _ in composite_questions(world, entity, **{root_relation: root})
                if r == root_relation
            ]
            q, a = rng.choice(options)
            return Probe(q, a, self.image(entity, rng))
        if kind == "other_entity_same":
            # Another entity whose memorised answer differs from the context's value, so the
            # example shows the memory winning rather than an answer the context also gives.
            other = self.other(rng, entity)
            if relation == "caption":
                return Probe(rng.choice(CAPTION_TEMPLATES[0]), world.caption(other), self.image(other, rng))
            if relation in other.withheld or other.answer(relation) == new:
                return None
            return Probe(
                rng.choice(image_questions(relation)), other.answer(relation), self.image(other, rng)
            )
        if kind == "other_entity":
            other = self.other(rng, entity)
            q, a = rng.choice([qa for group in self.image_qas[other.id].values() for qa in group])
            return Probe(q, a, self.image(other, rng))
        if kind == "same_entity_other":
            unrelated = [r for r in known_relations(entity) if r != relation]
            r = rng.choice(unrelated)
            return Probe(rng.choice(image_questions(r)), entity.answer(r), self.image(entity, rng))
        q, a = rng.choice(self.text_qas)
        return Probe(q, a)

    # ----------------------------------------------------------------- demonstrations
    def demonstration(self, rng: random.Random) -> ContextItem:
        """One of IKE's copy / update / retain demonstrations, about another entity, with its picture."""
        entity = rng.choice(self.world.entities)
        relation, q, new, root = self.counterfactual(rng, entity)
        fact = Probe(q, new)
        kind = rng.choice(("copy", "update", "retain"))
        if kind == "copy":
            return ContextItem(self.formats.demo(fact, fact, new), self.image(entity, rng))
        if kind == "update":
            wordings = CAPTION_TEMPLATES[0] if relation == "caption" else image_questions(relation)
            asked = Probe(rng.choice(wordings), new)
            return ContextItem(self.formats.demo(fact, asked, new), self.image(entity, rng))
        # Retain: IKE's pool pairs the fact with a locality probe and shows that probe's own image.
        unrelated = self.question(rng, rng.choice(("other_entity", "text")), entity, relation, new, root)
        return ContextItem(self.formats.demo(fact, unrelated, unrelated.answer), unrelated.image)

    # ----------------------------------------------------------------- examples
    def probe(self, rng: random.Random) -> Probe:
        """One in-context example: demonstrations, the new fact, and an answered question."""
        entity = rng.choice(self.world.entities)
        relation, fact_q, new, root = self.counterfactual(rng, entity)
        fact_image = self.image(entity, rng) if rng.random() < self.mix.fact_image_share else None
        question = None
        while question is None:
            kind = rng.choices(self.kinds, weights=self.weights)[0]
            question = self.question(rng, kind, entity, relation, new, root, fact_image)
        n_demos = rng.choices(range(5), weights=self.mix.demonstrations)[0]
        context = [self.demonstration(rng) for _ in range(n_demos)]
        context.append(ContextItem(self.formats.fact(Probe(fact_q, new)), fact_image))
        return Probe(
            self.formats.query(question.prompt), question.answer, question.image, context=tuple(context)
        )
