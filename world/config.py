"""`WorldConfig`: everything that decides one world. Same config (and seed) -> byte-identical files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from world.relations import EDIT_ORDER

#: Shapes are the hardest attribute for a tiny vision tower to tell apart (the feasibility runs), so a
#: world grows by colours and patterns; these four differ in outline, not just in detail.
ALL_SHAPES = ("circle", "square", "triangle", "cross")
ALL_COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 165, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 210),
    "purple": (135, 50, 170),
    "pink": (240, 120, 190),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "olive": (120, 130, 30),
    "navy": (20, 30, 110),
    # Added for the lifelong world (configs/world/lifelong.yaml); earlier worlds take the first n.
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "teal": (10, 120, 110),
    "maroon": (110, 20, 45),
}
ALL_PATTERNS = ("plain", "striped", "dotted", "checked", "ringed")
#: Bump when the generator's output changes for the same config (templates, layout), so cached world
#: folders are rebuilt rather than silently reused.
GENERATOR_VERSION = 2
#: Options (and their defaults) newer than the committed worlds: left out of `to_dict` at the default.
LATER_OPTIONS = {"unedited_locality": False}


@dataclass
class WorldConfig:
    """Sizes of one world.

    Args:
        seed: decides names, facts, splits, edits and every rendering.
        n_shapes, n_colours, n_patterns: the first n of each list above; entities are all combinations.
        image_size: side of every PNG and every training rendering.
        pool_size: training renderings per entity (ids 0..pool_size-1); written files use fresh ids.
        n_countries, n_makers: sizes of the two editable relations' value sets.
        withheld_fraction: share of (entity, withholdable relation) facts never shown to the backbone.
        split_fractions: editor-train and validation shares of the entities; the rest is evaluation.
        edits_per_entity: counterfactual edits per entity, in the order country, maker, owner,
            material (2: the two chain roots; 4: every fact of the entity, the lifelong world).
        unedited_locality: image-locality questions ask only relations no edit of the world changes
            (with 4 edits per entity: colour, shape, pattern), so that a sequence of every edit of a
            split never changes the answer of an earlier case's locality question: the lifelong
            world's non-conflicting edits. Off, they ask any relation the backbone knows.
        max_rotation: degrees either way; scale_range: sprite size as a share of the image side.
        noise: standard deviation of the pixel noise (0-255 scale).
    """

    seed: int = 0
    n_shapes: int = 4
    n_colours: int = 8
    n_patterns: int = 3
    image_size: int = 32
    pool_size: int = 128
    n_countries: int = 12
    n_makers: int = 10
    withheld_fraction: float = 0.35
    split_fractions: tuple[float, float] = (0.5, 0.15)
    edits_per_entity: int = 2
    unedited_locality: bool = False
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.7, 0.95)
    noise: float = 6.0

    def __post_init__(self) -> None:
        self.split_fractions = tuple(self.split_fractions)
        self.scale_range = tuple(self.scale_range)
        limits = {"n_shapes": ALL_SHAPES, "n_colours": ALL_COLOURS, "n_patterns": ALL_PATTERNS}
        for name, values in limits.items():
            if not 1 <= getattr(self, name) <= len(values):
                raise ValueError(f"world.{name} must be in 1..{len(values)}, got {getattr(self, name)}")
        if not 0 <= self.withheld_fraction < 1:
            raise ValueError(f"world.withheld_fraction must be in [0, 1), got {self.withheld_fraction}")
        if len(self.split_fractions) != 2 or sum(self.split_fractions) >= 1:
            raise ValueError(
                f"world.split_fractions (train, val) must leave a share for evaluation, got {self.split_fractions}"
            )
        if self.edits_per_entity not in (1, 2, 3, 4):
            raise ValueError(f"world.edits_per_entity must be in 1..4, got {self.edits_per_entity}")
        if self.n_countries < 4 or self.n_makers < 3:
            raise ValueError("world.n_countries must be >= 4 and world.n_makers >= 3 for counterfactuals")

    @property
    def shapes(self) -> tuple[str, ...]:
        return ALL_SHAPES[: self.n_shapes]

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(ALL_COLOURS)[: self.n_colours]

    @property
    def patterns(self) -> tuple[str, ...]:
        return ALL_PATTERNS[: self.n_patterns]

    @property
    def edited_relations(self) -> tuple[str, ...]:
        """The relations this world's edits change (the first `edits_per_entity` of `EDIT_ORDER`)."""
        return EDIT_ORDER[: self.edits_per_entity]

    def to_dict(self) -> dict:
        data = asdict(self)
        # Options added after worlds were committed are written only when set, so those worlds keep
        # their digest and their bytes (and the backbones trained on them stay valid).
        for name, default in LATER_OPTIONS.items():
            if data[name] == default:
                del data[name]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def digest(self) -> str:
        """A hash of the config and the generator's version: a folder with the same digest is reused."""
        key = {"config": self.to_dict(), "generator": GENERATOR_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_world_config(path: str | Path | None = None, **overrides: object) -> WorldConfig:
    """A `WorldConfig` from a YAML file (keys as the dataclass fields), with overrides on top."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data = data.get("world", data)
    known = {f.name for f in fields(WorldConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown world option(s) {unknown}; known: {sorted(known)}")
    return WorldConfig(**{**data, **overrides})
