"""An entity's visual identity (shape, colour, pattern) and its renderings, drawn with Pillow.

A rendering is fully decided by (world seed, entity id, rendering id): position, scale, rotation,
background tint and pixel noise are drawn from a generator seeded with that triple, so rendering 7 of
entity e012 is the same picture in every process and on every run. Training uses ids
0..pool_size-1; the written files use ids from `FRESH_ID` up, renderings the backbone never saw.

Drawing happens at 4x the output size and is downsampled, so edges and patterns survive at 32x32;
patterns are coarse (a few bands, dots or cells) for the same reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from world.config import ALL_COLOURS, WorldConfig

#: First rendering id of the written (held-out) renderings.
FRESH_ID = 100_000
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Look:
    """What an entity looks like."""

    shape: str
    colour: str
    pattern: str


def _shape_mask(shape: str, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(mask)
    m = side // 10
    if shape == "circle":
        pen.ellipse((m, m, side - m, side - m), fill=255)
    elif shape == "square":
        pen.rectangle(
            (m + side // 20, m + side // 20, side - m - side // 20, side - m - side // 20), fill=255
        )
    elif shape == "triangle":
        pen.polygon([(m, side - m), (side // 2, m), (side - m, side - m)], fill=255)
    elif shape == "cross":
        w = side // 6
        c = side // 2
        pen.rectangle((c - w, m, c + w, side - m), fill=255)
        pen.rectangle((m, c - w, side - m, c + w), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _pattern_layer(pattern: str, colour: tuple[int, int, int], side: int) -> Image.Image:
    """The sprite's fill: the colour, with the pattern in a darker shade of it."""
    layer = Image.new("RGB", (side, side), colour)
    dark = (
        tuple(int(c * 0.4) for c in colour) if sum(colour) > 150 else tuple(min(255, c + 130) for c in colour)
    )
    pen = ImageDraw.Draw(layer)
    step = side // 5
    if pattern == "striped":
        for y in range(0, side, 2 * step):
            pen.rectangle((0, y, side, y + step - 1), fill=dark)
    elif pattern == "dotted":
        r = side // 12
        for cy in (side // 4, side // 2, 3 * side // 4):
            for cx in (side // 4, side // 2, 3 * side // 4):
                pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=dark)
    elif pattern == "checked":
        for i in range(5):
            for j in range(5):
                if (i + j) % 2:
                    pen.rectangle((i * step, j * step, (i + 1) * step - 1, (j + 1) * step - 1), fill=dark)
    elif pattern == "ringed":
        c = side // 2
        for r in range(side // 2, 0, -step):
            if (r // step) % 2:
                pen.ellipse((c - r, c - r, c + r, c + r), fill=dark)
            else:
                pen.ellipse((c - r, c - r, c + r, c + r), fill=colour)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return layer


def render(look: Look, config: WorldConfig, entity_id: str, rendering_id: int) -> Image.Image:
    """One RGB rendering of `look`, deterministic in (config.seed, entity_id, rendering_id)."""
    rng = random.Random(f"{config.seed}/{entity_id}/{rendering_id}")
    out = config.image_size
    big = out * _SUPERSAMPLE
    grey = rng.randint(200, 245)
    background = tuple(max(0, min(255, grey + rng.randint(-12, 12))) for _ in range(3))
    canvas = Image.new("RGB", (big, big), background)
    scale = rng.uniform(*config.scale_range)
    sprite_side = max(8, int(big * scale))
    mask = _shape_mask(look.shape, sprite_side)
    fill = _pattern_layer(look.pattern, ALL_COLOURS[look.colour], sprite_side)
    angle = rng.uniform(-config.max_rotation, config.max_rotation)
    mask = mask.rotate(angle, resample=Image.BICUBIC)
    fill = fill.rotate(angle, resample=Image.BICUBIC)
    room = big - sprite_side
    x, y = rng.randint(0, room), rng.randint(0, room)
    canvas.paste(fill, (x, y), mask)
    small = canvas.resize((out, out), Image.BOX)
    if config.noise > 0:
        noise_rng = np.random.default_rng(rng.getrandbits(63))
        pixels = np.asarray(small, dtype=np.float32) + noise_rng.normal(0, config.noise, (out, out, 3))
        small = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "RGB")
    return small
