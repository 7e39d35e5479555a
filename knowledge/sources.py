"""Where mining gets its questions: the world's withheld facts, and benchmark training files.

Each source turns into `Question`s (prompt, true answer, the picture and where it lives) plus a
description that goes into the mining key, so that a changed source (another world, an edited file) is
never taken for the cached one.

- `WithheldSource`: every withheld fact of a world (never trained, so the world backbone mostly answers
  it wrongly) in every wording, on every training-pool rendering. That is the manifest's
  `triplet_capacity` (demo world: 69 facts x 3 wordings x 128 renderings = 26,496). Pool renderings
  are drawn in memory, as training draws them (`world.render.render`, deterministic in seed, entity
  and rendering id); only the pictures of kept triplets are written, under the knowledge folder.
- `AnnotationSource`: the Rel, T-Gen and I-Gen questions of an MMEdit (E-VQA / E-IC) or VLKEB training
  file, read by the loaders `edit.py` uses, with the edit target as the true answer. This is the
  source for real backbones; on the world it adds the editor-training split's edits. Only training
  files belong here: an evaluation file's targets in the knowledge memory would leak its answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from core.files import file_sha256
from datamodules.dataset import load_edit_dataset
from knowledge.store import KnowledgeOptionError
from world.backbones import load_world
from world.generate import SPLITS
from world.probes import withheld_qas
from world.render import render


@dataclass(frozen=True)
class Question:
    """One question to put to the backbone.

    `image` is the picture's path as stored in the triplets ("" for a text-only question); `picture`
    returns the picture itself. `rendered`: the picture is drawn in memory and must be written to
    `image` if the question is kept.
    """

    key: str
    source: str
    fact: str
    prompt: str
    answer: str
    image: str
    picture: Callable[[], Image.Image | None]
    rendered: bool = False


@dataclass
class WithheldSource:
    """A world's withheld facts, in every wording, on its training-pool renderings.

    Args:
        world_dir: a folder written by `python -m world.build`.
        world_config: a world YAML to build `world_dir` from when it is missing or stale.
        splits: the entity splits whose withheld facts are asked. Withheld facts (owner, material) are
            never edited, so every split may contribute; the demo world needs all three for 15K.
        renderings: the first n pool renderings per entity (None: the whole pool).
        held_out_wordings: also ask the held-out (T-Gen) wording of each fact.
    """

    world_dir: str
    world_config: str | None = None
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    renderings: int | None = None
    held_out_wordings: bool = True

    def questions(self, images_dir: Path) -> tuple[list[Question], dict[str, Any]]:
        """The questions (ordered entity, rendering, wording, so a chunk reuses its renderings) and a description."""
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise KnowledgeOptionError(f"withheld.splits: unknown split(s) {unknown}; known: {list(SPLITS)}")
        world = load_world(self.world_dir, self.world_config)
        pool = world.config.pool_size
        n = pool if self.renderings is None else self.renderings
        if not 1 <= n <= pool:
            raise KnowledgeOptionError(
                f"withheld.renderings must be in 1..{pool} (the world's pool_size), got {n}"
            )
        out: list[Question] = []
        for entity in world.entities:
            if entity.split not in self.splits:
                continue
            qas = [(q, a) for q, a, held in withheld_qas(entity) if self.held_out_wordings or not held]
            for rid in range(n):
                path = images_dir / entity.id / f"{rid}.png"
                picture = functools.partial(render, entity.look, world.config, entity.id, rid)
                for qi, (question, answer) in enumerate(qas):
                    out.append(
                        Question(
                            key=f"withheld/{entity.id}/{qi}/{rid}",
                            source="world_withheld",
                            fact=f"{entity.id}/{answer}",
                            prompt=question,
                            answer=answer,
                            image=str(path),
                            picture=picture,
                            rendered=True,
                        )
                    )
        return out, {"withheld": asdict(self), "world_digest": world.config.digest()}


@dataclass
class AnnotationSource:
    """A benchmark training file's edit questions, with the edit target as the true answer.

    Args:
        file: JSON list of MMEdit (E-VQA / E-IC) or VLKEB records.
        image_root: folder the records' image paths are relative to.
        format: `auto`, `mmedit_vqa`, `mmedit_caption` or `vlkeb`.
        prompt_template: as `edit.py`'s data option (`"{}"` for the world's raw questions).
        loc_image_template: as `edit.py`'s data option (only checked here: locality is not asked).
        kinds: which probes of each case are asked (`rel`, `t_gen`, `i_gen`, `port`).
        on_bad_record: `error` stops at a bad record; `skip` counts it (in the mining counts).
        limit: only the first `limit` valid cases.
    """

    file: str
    image_root: str
    format: str = "auto"
    prompt_template: str | None = None
    loc_image_template: str | None = None
    kinds: list[str] = field(default_factory=lambda: ["rel", "t_gen", "i_gen"])
    on_bad_record: str = "error"
    limit: int | None = None

    def questions(self) -> tuple[list[Question], dict[str, Any], dict[str, int]]:
        """The questions, a description, and the loader's skipped records by reason."""
        data = load_edit_dataset(
            self.file,
            self.image_root,
            format=self.format,
            prompt_template=self.prompt_template,
            loc_image_template=self.loc_image_template,
            on_bad_record=self.on_bad_record,
            limit=self.limit,
        )
        name = Path(self.file).name
        out: list[Question] = []
        for plan in data.plans:
            for kind in self.kinds:
                for j, probe in enumerate(plan.probes.get(kind, [])):
                    out.append(
                        Question(
                            key=f"{name}/{plan.case_id}/{kind}/{j}",
                            source=f"{name}:{kind}",
                            fact=plan.case_id,
                            prompt=probe.prompt,
                            answer=probe.answer,
                            image=str(Path(self.image_root) / probe.image) if probe.image else "",
                            picture=functools.partial(data.loader.load, probe.image)
                            if probe.image
                            else _none,
                        )
                    )
        skipped = {f"bad record: {k}": v for k, v in data.describe()["skip_reasons"].items()}
        return out, {"annotation": asdict(self), "sha256": file_sha256(self.file)}, skipped


def _none() -> None:
    return None
