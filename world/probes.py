"""The questions of the world as (prompt, answer) texts, shared by the writers, training and checking.

Keeping every wording in one place is what makes "held out" mean something: training draws only from
`train_*` functions here, the written T-Gen rephrasings and `world.check` use the held-out ones.
"""

from __future__ import annotations

from world.generate import Entity, World
from world.relations import (
    ATTRIBUTES,
    CAPTION_TEMPLATES,
    CHAINS,
    COMPOSITE_TEMPLATES,
    EDITABLE,
    IMAGE_TEMPLATES,
    TEXT_TEMPLATES,
    WITHHOLDABLE,
)


def image_questions(relation: str, held_out: bool = False) -> tuple[str, ...]:
    """The training (or held-out) wordings of an image question about `relation`."""
    return IMAGE_TEMPLATES[relation][1 if held_out else 0]


def text_question(relation: str, subject: str, variant: int = 0) -> str:
    templates = TEXT_TEMPLATES[relation][1]
    return templates[variant % len(templates)].format(s=subject)


def known_relations(entity: Entity) -> list[str]:
    """Image relations whose true answer the backbone is trained on (withheld ones left out)."""
    facts = [r for r in (*EDITABLE, *WITHHOLDABLE) if r not in entity.withheld]
    return [*facts, *ATTRIBUTES]


def composite_questions(world: World, entity: Entity, country: str | None = None, maker: str | None = None):
    """(prompt, answer, root relation, hops) of every composite question, true facts unless overridden."""
    roots = {"country": country or entity.facts["country"], "maker": maker or entity.facts["maker"]}
    out = []
    for (root, hops), template in COMPOSITE_TEMPLATES.items():
        if hops <= len(CHAINS[root]):
            out.append((template, world.chain(root, roots[root], hops), root, hops))
    return out


def train_image_qas(world: World, entity: Entity) -> list[tuple[str, str]]:
    """Every (question, answer) about an entity's image that the backbone is trained on."""
    qas = [(q, entity.answer(r)) for r in known_relations(entity) for q in image_questions(r)]
    qas += [(q, a) for q, a, _, _ in composite_questions(world, entity)]
    qas += [(q, world.caption(entity)) for q in CAPTION_TEMPLATES[0]]
    return qas


def grouped_image_qas(world: World, entity: Entity) -> dict[str, list[tuple[str, str]]]:
    """`train_image_qas` split into facts, attributes, composites and captions (training draws by group)."""
    relations = known_relations(entity)
    return {
        "facts": [
            (q, entity.answer(r)) for r in relations if r not in ATTRIBUTES for q in image_questions(r)
        ],
        "attributes": [(q, entity.answer(r)) for r in ATTRIBUTES for q in image_questions(r)],
        "composites": [(q, a) for q, a, _, _ in composite_questions(world, entity)],
        "captions": [(q, world.caption(entity)) for q in CAPTION_TEMPLATES[0]],
    }


def train_text_qas(world: World) -> list[tuple[str, str]]:
    """Every text-only (question, answer) the backbone is trained on."""
    return [(t.format(s=s), a) for rel, s, a in world.text_facts() for t in TEXT_TEMPLATES[rel][1]]


def withheld_qas(entity: Entity) -> list[tuple[str, str, bool]]:
    """(question, true answer, held-out wording?) of an entity's withheld facts: never trained."""
    return [
        (q, entity.facts[r], held_out)
        for r in entity.withheld
        for held_out in (False, True)
        for q in image_questions(r, held_out)
    ]
