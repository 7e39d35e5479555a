"""`WorldTrainData`: training batches for the world backbone, drawn from a world folder's true facts.

Two stages (the LLaVA recipe the feasibility runs confirmed on 2 CPU cores):

- stage 0, `stage0_steps` batches of `{"images", "labels"}`: renderings and their colour / shape /
  pattern indices, for the vision tower alone;
- stage 1, `stage1_steps` batches of `Probe`s, put through `vlm.loss` so the prompt layout is exactly
  the one used at edit time. A batch is either plain (image questions on training renderings,
  attribute, composite and caption questions included, plus a `text_share` of text facts) or, with
  probability `context_batch_share`, a whole in-context batch laid out as IKE lays it out
  ("New Fact: ..." with its image, then "Prompt: ..."): counterfactual facts that must be answered
  from the context, and irrelevant facts whose answer must stay the memorised one. Whole batches,
  not mixed in: mixing pads every row to the long context rows (the feasibility finding).
  Stage-1 batches are drawn `length_buckets` at a time and their rows regrouped by length, so a
  batch pads little (padding was ~40% of a randomly drawn batch).

Withheld facts and held-out wordings never appear; only training renderings (ids < pool_size) do.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from core.case import ContextItem, Probe
from datamodules.world_context import ContextMix, InContextExamples
from world.backbones import load_world
from world.generate import Entity, World
from world.probes import (
    composite_questions,
    grouped_image_qas,
    image_questions,
    known_relations,
    train_text_qas,
)
from world.relations import CAPTION_TEMPLATES, EDITABLE
from world.render import render

FACT_FORMAT = "New Fact: {prompt} {target}"
QUERY_FORMAT = "Prompt: {prompt}"
DEMO_FORMAT = "New Fact: {prompt} {target}\nPrompt: {query} {answer}"


class Renderings:
    """Training renderings, drawn once on first use and kept (a pool is ~12k 32x32 images)."""

    def __init__(self, world: World, pool_size: int) -> None:
        self.world, self.pool_size = world, pool_size
        self.cache: dict[tuple[str, int], Image.Image] = {}

    def get(self, entity: Entity, rng: random.Random) -> Image.Image:
        key = (entity.id, rng.randrange(self.pool_size))
        if key not in self.cache:
            self.cache[key] = render(entity.look, self.world.config, entity.id, key[1])
        return self.cache[key]


class WorldBatches(IterableDataset):
    """The whole training schedule as one stream of ready batches (stage 0 first, then stage 1)."""

    def __init__(self, data: WorldTrainData) -> None:
        self.d = data
        self.world = data.world
        self.images = Renderings(self.world, data.pool_size)
        self.text_qas = train_text_qas(self.world)
        self.groups = ("facts", "attributes", "composites", "captions")
        self.image_qas = {e.id: grouped_image_qas(self.world, e) for e in self.world.entities}
        cfg = self.world.config
        self.in_context = (
            InContextExamples(self.world, self.images.get, self.image_qas, self.text_qas, data.context_mix)
            if data.context_mix is not None
            else None
        )
        self.attr_index = [
            {v: i for i, v in enumerate(values)} for values in (cfg.colours, cfg.shapes, cfg.patterns)
        ]

    def __len__(self) -> int:
        # Known up front, so the progress bar shows the whole schedule.
        return self.d.stage0_steps + self.d.stage1_steps

    def __iter__(self) -> Iterator[object]:
        rng = random.Random(self.d.seed)
        for _ in range(self.d.stage0_steps):
            yield self.attribute_batch(rng)
        done = 0
        while done < self.d.stage1_steps:
            window = min(self.d.length_buckets, self.d.stage1_steps - done)
            yield from self.bucketed(rng, window, self.d.context_share_at(done))
            done += window

    def bucketed(self, rng: random.Random, window: int, context_share: float) -> list[list[Probe]]:
        """`window` stage-1 batches whose rows were regrouped by length.

        A batch is padded to its longest row, and drawn at random ~40% of a plain batch was padding.
        Drawing `window` batches, sorting each kind's rows by length and cutting them back into
        batches keeps what is trained on (and which batches are in-context ones) and leaves ~6%
        padding: about 1.5x less work per step.
        """
        kinds = [rng.random() < context_share for _ in range(window)]
        rows = {
            kind: sorted(
                (p for is_context in kinds if is_context == kind for p in self.draw_batch(rng, kind)),
                key=probe_length,
            )
            for kind in (False, True)
        }
        out, taken = [], {False: 0, True: 0}
        for kind in kinds:
            start = taken[kind]
            out.append(rows[kind][start : start + self.d.batch_size])
            taken[kind] = start + self.d.batch_size
        rng.shuffle(out)
        return out

    def draw_batch(self, rng: random.Random, context: bool) -> list[Probe]:
        return self.context_batch(rng) if context else self.fact_batch(rng)

    def attribute_batch(self, rng: random.Random) -> dict[str, object]:
        entities = [rng.choice(self.world.entities) for _ in range(self.d.batch_size)]
        labels = [
            [
                idx[v]
                for idx, v in zip(self.attr_index, (e.look.colour, e.look.shape, e.look.pattern), strict=True)
            ]
            for e in entities
        ]
        return {"images": [self.images.get(e, rng) for e in entities], "labels": torch.tensor(labels)}

    def fact(self, rng: random.Random) -> Probe:
        if rng.random() < self.d.text_share:
            q, a = rng.choice(self.text_qas)
            return Probe(q, a)
        entity = rng.choice(self.world.entities)
        # Drawn by group, not uniformly over questions: a caption is five answer tokens, so uniform
        # drawing let captions dominate the token-mean loss and left the one-token facts underfit.
        group = rng.choices(self.groups, weights=self.d.group_weights)[0]
        q, a = rng.choice(self.image_qas[entity.id][group])
        return Probe(q, a, self.images.get(entity, rng))

    def fact_batch(self, rng: random.Random) -> list[Probe]:
        return [self.fact(rng) for _ in range(self.d.batch_size)]

    def counterfactual(self, rng: random.Random, entity: Entity) -> tuple[str, str, str, str]:
        """(relation, question, new answer, root value) of a made-up fact about `entity`."""
        # Every relation the world's edits change (the demo: country and maker; the lifelong world
        # also owner and material), so the backbone learns to read an in-context fact of each kind.
        relation = rng.choice([*self.world.config.edited_relations, "caption"])
        if relation == "caption":
            country = rng.choice(self.world.values["country"])
            return "caption", rng.choice(CAPTION_TEMPLATES[0]), self.world.caption(entity, country), country
        value = rng.choice([v for v in self.world.values[relation] if v != entity.facts[relation]])
        return relation, rng.choice(image_questions(relation)), value, value

    def context_probe(self, rng: random.Random) -> Probe:
        world = self.world
        entity = rng.choice(world.entities)
        relation, fact_q, fact_a, root = self.counterfactual(rng, entity)
        fact_image = self.images.get(entity, rng)
        roll = rng.random()
        if roll < 0.4:  # the fact itself, in any training wording, on this or another rendering
            if relation == "caption":
                q, a = rng.choice(CAPTION_TEMPLATES[0]), fact_a
            else:
                q, a = rng.choice(image_questions(relation)), fact_a
            probe = Probe(q, a, fact_image if rng.random() < 0.5 else self.images.get(entity, rng))
        elif roll < 0.55 and relation in EDITABLE:  # what follows from the fact (portability)
            kwargs = {relation: root}
            options = [(q, a) for q, a, r, _ in composite_questions(world, entity, **kwargs) if r == relation]
            q, a = rng.choice(options)
            probe = Probe(q, a, self.images.get(entity, rng))
        else:  # irrelevant context: another entity, another relation, or a text fact keeps its answer
            kind = rng.random()
            if kind < 0.45:
                other = rng.choice([e for e in world.entities if e.id != entity.id])
                q, a = rng.choice([qa for group in self.image_qas[other.id].values() for qa in group])
                probe = Probe(q, a, self.images.get(other, rng))
            elif kind < 0.75:
                unrelated = [r for r in known_relations(entity) if r != relation]
                r = rng.choice(unrelated)
                probe = Probe(rng.choice(image_questions(r)), entity.answer(r), self.images.get(entity, rng))
            else:
                q, a = rng.choice(self.text_qas)
                probe = Probe(q, a)
        context = [ContextItem(FACT_FORMAT.format(prompt=fact_q, target=fact_a), fact_image)]
        # IKE may put demonstrations before the new fact: show the model that layout too.
        for _ in range(rng.choice((0, 0, 0, 1))):
            demo_entity = rng.choice(world.entities)
            _, dq, da, _ = self.counterfactual(rng, demo_entity)
            text = DEMO_FORMAT.format(prompt=dq, target=da, query=dq, answer=da)
            context.insert(0, ContextItem(text, self.images.get(demo_entity, rng)))
        return Probe(
            QUERY_FORMAT.format(prompt=probe.prompt), probe.answer, probe.image, context=tuple(context)
        )

    def context_batch(self, rng: random.Random) -> list[Probe]:
        # An explicit `context_mix` opts into `datamodules/world_context.py` (issue 12's recipe, in
        # progress); without it the batches are the committed backbones' own, byte for byte.
        if self.in_context is not None:
            return [self.in_context.probe(rng) for _ in range(self.d.batch_size)]
        return [self.context_probe(rng) for _ in range(self.d.batch_size)]


#: An image's weight in `probe_length`: the world backbones' 16 image tokens.
IMAGE_WORDS = 16


def probe_length(probe: Probe) -> int:
    """A probe's length in words and images, the sort key of length bucketing (word-level tokens)."""
    texts = [probe.prompt, probe.answer, *(item.text for item in probe.context)]
    images = (probe.image is not None) + sum(item.image is not None for item in probe.context)
    return sum(len(t.split()) for t in texts) + IMAGE_WORDS * images


def _identity(batch: object) -> object:
    return batch


class WorldTrainData(L.LightningDataModule):
    """Batches of the world's training facts for `WorldBackboneTraining`.

    Args:
        world_dir: a folder written by `python -m world.build`.
        batch_size: examples per batch (stage 0 and stage 1).
        stage0_steps: vision-attribute batches first.
        stage1_steps: fact batches after them.
        text_share: share of text-only facts in a plain fact batch.
        context_batch_share: share of stage-1 batches that are whole in-context batches.
        context_share_end: the share at the end of stage 1, reached linearly from
            `context_batch_share` (None: constant). A curriculum: the memorised facts first, then
            reading a context against them, which an in-context example about an unlearnt fact
            cannot teach.
        pool_size: training renderings per entity (None: the world's own pool_size).
        group_weights: how often a plain image question is an entity fact, an attribute, a composite
            (1..4 hops) or a caption.
        seed: the batch stream's seed.
        num_workers: 1 draws (and renders) batches in a worker process while the model trains on
            the previous one; more than 1 would split the single ordered stream, so it is refused.
        length_buckets: stage-1 batches drawn together and regrouped by row length (1: off), so a
            batch pads little; see `WorldBatches.bucketed`.
        world_config: a world YAML to build `world_dir` from when it is missing or stale.
        context_mix: what in-context examples ask (`datamodules/world_context.py`, IKE's layout with
            demonstrations and hard negatives; issue 12's recipe, in progress). None: the in-context
            batches the committed world backbones were trained with.
    """

    def __init__(
        self,
        world_dir: str,
        batch_size: int = 64,
        stage0_steps: int = 300,
        stage1_steps: int = 1200,
        text_share: float = 0.15,
        context_batch_share: float = 0.15,
        context_share_end: float | None = None,
        pool_size: int | None = None,
        group_weights: tuple[float, float, float, float] = (0.45, 0.2, 0.25, 0.1),
        seed: int = 0,
        length_buckets: int = 1,
        num_workers: int = 0,
        world_config: str | None = None,
        context_mix: ContextMix | None = None,
    ) -> None:
        super().__init__()
        if num_workers not in (0, 1):
            raise ValueError(f"num_workers must be 0 or 1 (one ordered batch stream), got {num_workers}")
        if batch_size < 1 or stage0_steps < 0 or stage1_steps < 0 or length_buckets < 1:
            raise ValueError("batch_size, length_buckets must be >= 1 and stage0_steps, stage1_steps >= 0")
        self.save_hyperparameters()
        self.world_dir = world_dir
        self.batch_size = batch_size
        self.stage0_steps = stage0_steps
        self.stage1_steps = stage1_steps
        self.text_share = text_share
        self.context_batch_share = context_batch_share
        self.context_share_end = context_share_end
        self.context_mix = context_mix
        self.seed = seed
        self.length_buckets = length_buckets
        self.num_workers = num_workers
        self.group_weights = tuple(group_weights)
        self.world = load_world(world_dir, world_config)
        self.pool_size = pool_size or self.world.config.pool_size

    def context_share_at(self, step: int) -> float:
        """The in-context share of the stage-1 batches drawn at stage-1 step `step`."""
        if self.context_share_end is None or self.stage1_steps <= 1:
            return self.context_batch_share
        progress = step / (self.stage1_steps - 1)
        return self.context_batch_share + (self.context_share_end - self.context_batch_share) * progress

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            WorldBatches(self), batch_size=None, collate_fn=_identity, num_workers=self.num_workers
        )

    def transfer_batch_to_device(self, batch: object, device: torch.device, dataloader_idx: int) -> object:
        """Probes hold PIL images and strings; the backbone builds its own tensors on its device."""
        if isinstance(batch, dict):
            return {"images": batch["images"], "labels": batch["labels"].to(device)}
        return batch
