"""The world itself: value sets, chain links, entities with facts, withheld facts, splits and edits.

`generate_world(config)` is a pure function of the config: one `random.Random(seed)` draws everything
in a fixed order, so the same seed gives the same world (and, through `world.writers`, the same bytes).
`World.to_dict()` / `World.from_dict()` round-trip it through `world.json`, which is what training and
checking read: they never regenerate, so a world folder is the single source of truth.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from itertools import product

from world.config import WorldConfig
from world.relations import (
    CAPTION_FORMAT,
    CHAINS,
    EDITABLE,
    MATERIALS,
    TEXT_TEMPLATES,
    WITHHOLDABLE,
    make_names,
)
from world.render import Look

SPLITS = ("train", "val", "eval")


@dataclass
class Entity:
    """One drawn object: its look, its facts (relation -> value), the facts withheld, its split."""

    id: str
    look: Look
    facts: dict[str, str]
    withheld: tuple[str, ...]
    split: str

    def answer(self, relation: str) -> str:
        if relation in ("colour", "shape", "pattern"):
            return getattr(self.look, relation)
        return self.facts[relation]


@dataclass(frozen=True)
class Edit:
    """A counterfactual edit: `entity`'s `relation` becomes `new` (it was `old`)."""

    entity: str
    relation: str
    old: str
    new: str


@dataclass
class World:
    config: WorldConfig
    values: dict[str, list[str]]
    links: dict[str, dict[str, str]]
    entities: list[Entity]
    edits: list[Edit] = field(default_factory=list)

    def entity(self, entity_id: str) -> Entity:
        return self._by_id[entity_id]

    def __post_init__(self) -> None:
        self._by_id = {e.id: e for e in self.entities}

    def split(self, name: str) -> list[Entity]:
        return [e for e in self.entities if e.split == name]

    def chain(self, root: str, value: str, hops: int) -> str:
        """The value `hops` links down the chain rooted at relation `root`, starting from `value`."""
        for relation in CHAINS[root][:hops]:
            value = self.links[relation][value]
        return value

    def caption(self, entity: Entity, country: str | None = None) -> str:
        look = entity.look
        return CAPTION_FORMAT.format(
            colour=look.colour,
            pattern=look.pattern,
            shape=look.shape,
            country=country or entity.facts["country"],
        )

    def text_facts(self) -> list[tuple[str, str, str]]:
        """Every (relation, subject, answer) text fact, in a fixed order."""
        return [(rel, s, a) for rel in TEXT_TEMPLATES for s, a in self.links[rel].items()]

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "values": self.values,
            "links": self.links,
            "entities": [
                {
                    "id": e.id,
                    "look": asdict(e.look),
                    "facts": e.facts,
                    "withheld": list(e.withheld),
                    "split": e.split,
                }
                for e in self.entities
            ],
            "edits": [asdict(x) for x in self.edits],
        }

    @classmethod
    def from_dict(cls, data: dict) -> World:
        entities = [
            Entity(d["id"], Look(**d["look"]), d["facts"], tuple(d["withheld"]), d["split"])
            for d in data["entities"]
        ]
        return cls(
            WorldConfig(**data["config"]),
            data["values"],
            data["links"],
            entities,
            [Edit(**x) for x in data["edits"]],
        )


def _balanced(rng: random.Random, values: list[str], n: int) -> list[str]:
    """n draws that use every value about equally often (so no answer dominates by frequency)."""
    out: list[str] = []
    while len(out) < n:
        block = list(values)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def _pick_counterfactual(rng: random.Random, world: World, relation: str, old: str) -> str:
    """A new value whose whole chain differs from the old one's where the value sets allow it.

    Then every portability hop really needs the edit: no hop's answer is right by accident.
    """
    candidates = [v for v in world.values[relation] if v != old]
    hops = len(CHAINS.get(relation, ()))

    def differs(v: str) -> int:
        return sum(world.chain(relation, v, h) != world.chain(relation, old, h) for h in range(1, hops + 1))

    best = max(differs(v) for v in candidates)
    return rng.choice([v for v in candidates if differs(v) == best])


def generate_world(config: WorldConfig) -> World:
    rng = random.Random(config.seed)
    taken: set[str] = set()
    n_continents = 4
    values = {
        "country": make_names(rng, config.n_countries, taken),
        "capital": make_names(rng, config.n_countries, taken),
        "continent": make_names(rng, n_continents, taken),
        "ocean": make_names(rng, n_continents, taken),
        "island": make_names(rng, n_continents, taken),
        "maker": make_names(rng, config.n_makers, taken),
        "birthplace": make_names(rng, config.n_makers, taken),
        "river": make_names(rng, max(3, config.n_makers // 2), taken),
        "owner": make_names(rng, 10, taken),
        "material": list(MATERIALS),
    }
    continent_of = _balanced(rng, values["continent"], config.n_countries)
    river_of = _balanced(rng, values["river"], config.n_makers)
    links = {
        "capital": dict(zip(values["country"], values["capital"], strict=True)),
        "continent": dict(zip(values["capital"], continent_of, strict=True)),
        "ocean": dict(zip(values["continent"], values["ocean"], strict=True)),
        "island": dict(zip(values["ocean"], values["island"], strict=True)),
        "birthplace": dict(zip(values["maker"], values["birthplace"], strict=True)),
        "river": dict(zip(values["birthplace"], river_of, strict=True)),
    }
    looks = [Look(s, c, p) for s, c, p in product(config.shapes, config.colours, config.patterns)]
    n = len(looks)
    facts = {rel: _balanced(rng, values[rel], n) for rel in (*EDITABLE, *WITHHOLDABLE)}
    order = list(range(n))
    rng.shuffle(order)
    n_train = max(1, round(n * config.split_fractions[0]))
    n_val = max(1, round(n * config.split_fractions[1]))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "eval"
    entities = []
    for i, look in enumerate(looks):
        withheld = tuple(r for r in WITHHOLDABLE if rng.random() < config.withheld_fraction)
        entity_facts = {rel: facts[rel][i] for rel in facts}
        entities.append(Entity(f"e{i:03d}", look, entity_facts, withheld, split_of[i]))
    world = World(config, values, links, entities)
    for entity in entities:
        for relation in config.edited_relations:
            old = entity.facts[relation]
            world.edits.append(
                Edit(entity.id, relation, old, _pick_counterfactual(rng, world, relation, old))
            )
    return world
