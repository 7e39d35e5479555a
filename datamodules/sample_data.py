"""Write a small, deterministic sample of the MMEdit and VLKEB schemas, with images drawn by Pillow.

    python -m datamodules.sample_data data/sample

It exists to exercise the data pipeline end to end (every schema, every image mode, odd sizes), not to
measure editing: the pictures are coloured shapes and the facts are made up. Layout under OUT_DIR:

    mmedit/vqa_eval.json  mmedit/vqa_train.json  mmedit/caption_eval_edit.json  mmedit/caption_train_edit.json
    vlkeb/eval.json  vlkeb/train.json  vlkeb/eval_multihop.json  vlkeb/eval_edit_onehop.json
    images/coco/val2014/...            edit images (PNG and JPEG, every mode)
    images/coco/val2014_rephrase/...   I-Gen images of the same shapes
    images/coco/train2014/...          I-Loc images
    images/VLKEB_images/<entity id>/<name>.jpg   two photos per entity (RGB and CMYK JPEG)

The image root for every annotation file is OUT_DIR/images.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

N_EVAL, N_TRAIN = 12, 24
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 30),
    "purple": (130, 50, 160),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
#: (file suffix, mode) pairs cycled through so every pool holds every mode.
MODES = (("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("png", "P"), ("png", "P+t"), ("png", "I;16"),
         ("jpg", "CMYK"), ("png", "LA"), ("png", "RGB"))  # fmt: skip
TEXT_QA = (
    ("who wrote the play hamlet", "william shakespeare"),
    ("what is the boiling point of water in celsius", "100 degrees"),
    ("how many legs does a spider have", "eight"),
    ("which planet is known as the red planet", "mars"),
    ("what is the largest ocean on earth", "the pacific ocean"),
    ("who painted the mona lisa", "leonardo da vinci"),
    ("what gas do plants absorb from the air", "carbon dioxide"),
    ("how many days are in a leap year", "366"),
)
MAKERS = ("Aldrin Works", "Borealis Co", "Castile Forge", "Dunmore Labs", "Elmsworth Ltd", "Fjord Motors")
COUNTRY = {"Aldrin Works": "Norland", "Borealis Co": "Estavia", "Castile Forge": "Quell",
           "Dunmore Labs": "Marrow", "Elmsworth Ltd": "Tessaly", "Fjord Motors": "Urbania"}  # fmt: skip
CAPITAL = {
    "Norland": "Veld",
    "Estavia": "Orrin",
    "Quell": "Sabre",
    "Marrow": "Lune",
    "Tessaly": "Pike",
    "Urbania": "Cask",
}
CONTINENT = {
    "Veld": "Arkadia",
    "Orrin": "Boros",
    "Sabre": "Arkadia",
    "Lune": "Cymra",
    "Pike": "Boros",
    "Cask": "Cymra",
}
MOTTO = {"Arkadia": "north", "Boros": "south", "Cymra": "east"}


def draw(
    shape: str, colour: str, size: tuple[int, int], mode: str, background: tuple[int, int, int]
) -> Image.Image:
    """One shape on a plain background, converted to `mode`; transparent modes get a clear background."""
    transparent = mode in ("RGBA", "LA", "P+t")
    img = Image.new("RGBA", size, (*background, 0 if transparent else 255))
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    fill = (*COLOURS[colour], 255)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    else:
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        pen.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fill)
    if mode == "RGBA":
        return img
    if mode == "LA":
        return img.convert("LA")
    if mode == "P+t":
        # Palette index 0 is the transparent background; the shape gets its own index.
        pal = Image.new("P", size, 0)
        pal.putpalette([*background, *COLOURS[colour]] + [0, 0, 0] * 254)
        pal.paste(1, mask=img.getchannel("A"))
        pal.info["transparency"] = 0
        return pal
    rgb = img.convert("RGB")
    if mode == "P":
        return rgb.quantize(colors=8)
    if mode == "I;16":
        # A 16-bit grey image using the whole 0..65535 range, so an 8-bit clip would show up as white.
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey)
    return rgb.convert(mode)


def save(img: Image.Image, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        img.save(path, "JPEG", quality=80)
    elif mode == "P+t":
        img.save(path, "PNG", transparency=0, optimize=False)
    else:
        img.save(path, "PNG", optimize=False)


class Pool:
    """Deterministic image pools: every call draws a new image and returns its relative path."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng, self.count = root, rng, 0

    def image(
        self, rel_stem: str, shape: str, colour: str, mode_offset: int = 0, suffix: str | None = None
    ) -> str:
        ext, mode = MODES[(self.count + mode_offset) % len(MODES)]
        if suffix == "jpg" and ext != "jpg":
            mode = "CMYK" if self.count % 2 else "RGB"
        ext = suffix or ext
        self.count += 1
        size = (self.rng.randint(24, 96), self.rng.randint(24, 96))
        background = (self.rng.randint(150, 255), self.rng.randint(150, 255), self.rng.randint(150, 255))
        rel = f"{rel_stem}.{ext}"
        save(draw(shape, colour, size, mode, background), self.root / rel, mode)
        return rel


def other(rng: random.Random, options: tuple[str, ...] | list[str], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


def loc_images(pool: Pool, n: int = 12) -> list[tuple[str, str]]:
    """Unrelated OK-VQA-style images shared by all files (real benchmarks reuse them too): (path, shape)."""
    out = []
    for k in range(n):
        shape, colour = SHAPES[(k + 1) % len(SHAPES)], list(COLOURS)[(k + 2) % len(COLOURS)]
        out.append((pool.image(f"coco/train2014/COCO_train2014_{20000 + k:012d}", shape, colour, 2), shape))
    return out


def mmedit_records(
    pool: Pool, locs: list[tuple[str, str]], rng: random.Random, n: int, split: str, caption: bool
) -> list[dict[str, Any]]:
    records = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i * 5 + (split == "train")) % len(COLOURS)]
        new = other(rng, list(COLOURS), colour)
        coco_id = 100 + i + (1000 if split == "train" else 0) + (5000 if caption else 0)
        image = pool.image(f"coco/val2014/COCO_val2014_{coco_id:012d}", shape, colour)
        rephrase_image = pool.image(f"coco/val2014_rephrase/COCO_val2014_{coco_id:012d}", shape, colour, 4)
        m_loc, loc_shape = locs[(i * 5 + caption) % len(locs)]
        loc, loc_ans = TEXT_QA[i % len(TEXT_QA)]
        if caption:
            src, rephrase = rng.choice([("a photo of", "a picture of"), ("an image of", "a drawing of")])
            pred, alt = f"a {colour} {shape}", f"a {new} {shape} on a plain background"
        else:
            src, rephrase = (
                f"What colour is the {shape}?",
                f"Which colour does the {shape} in the picture have?",
            )
            pred, alt = colour, new
        records.append({
            "src": src, "pred": pred, "rephrase": rephrase, "alt": alt, "image": image,
            "image_rephrase": rephrase_image, "loc": loc, "loc_ans": loc_ans, "m_loc": m_loc,
            "m_loc_q": "What shape is shown?", "m_loc_a": loc_shape,
        })  # fmt: skip
    return records


def entity_photos(pool: Pool, n_entities: int) -> list[dict[str, str]]:
    """Two JPEG photos per entity, stored as VLKEB does: VLKEB_images/<entity id>/<name>.jpg."""
    entities = []
    for k in range(n_entities):
        mid = f"m.0{k:02d}x{k * 7 % 10}q"
        shape, colour = SHAPES[k % len(SHAPES)], list(COLOURS)[k % len(COLOURS)]
        name = f"{colour}_{shape}_{k}"
        edit = pool.image(f"VLKEB_images/{mid}/{name}_1", shape, colour, suffix="jpg")
        again = pool.image(f"VLKEB_images/{mid}/{name}_2", shape, colour, suffix="jpg")
        entities.append({"maker": MAKERS[k % len(MAKERS)], "image": edit, "image_rephrase": again})
    return entities


def vlkeb_records(
    entities: list[dict[str, str]], locs: list[tuple[str, str]], rng: random.Random, n: int, kind: str
) -> list[dict[str, Any]]:
    records = []
    for i in range(n):
        ent = entities[(i * 3 + (kind == "train")) % len(entities)]
        new = other(rng, MAKERS, ent["maker"])
        loc, loc_ans = TEXT_QA[(i + 3) % len(TEXT_QA)]
        m_loc, loc_shape = locs[(i * 7 + len(kind)) % len(locs)]
        rec: dict[str, Any] = {
            "src": "Which company made the object in the image?", "pred": ent["maker"],
            "rephrase": "The object shown here was produced by which company?", "alt": new,
            "image": ent["image"], "image_rephrase": ent["image_rephrase"], "loc": loc, "loc_ans": loc_ans,
            "m_loc": m_loc, "m_loc_q": "What shape is in this picture?", "m_loc_a": loc_shape,
        }  # fmt: skip
        country = COUNTRY[new]
        capital = CAPITAL[country]
        chain = [
            ("In which country is the maker of the object in the image based?", country),
            ("What is the capital of the country where the object's maker is based?", capital),
            ("On which continent lies the capital of the object's maker's country?", CONTINENT[capital]),
            ("Which compass direction names the continent of that capital?", MOTTO[CONTINENT[capital]]),
        ]
        if kind == "multihop":
            hops = range(1, 2 + i % 4)
            rec["port_new"] = [
                {"port_type": f"{h}-hop", "Q&A": {"Question": chain[h - 1][0], "Answer": chain[h - 1][1]}}
                for h in hops
            ]
        elif kind == "onehop":
            moved = other(rng, list(CAPITAL), country)
            rec["port_new"] = [
                {"port_q": chain[1][0], "port_a": CAPITAL[moved],
                 "port_edit_q": f"In which country is {new} based?", "port_edit_a": moved}
            ]  # fmt: skip
        records.append(rec)
    return records


def write(out_dir: str | Path) -> dict[str, int]:
    """Write the whole sample under `out_dir`; returns the number of records per annotation file."""
    out = Path(out_dir)
    rng = random.Random(20240611)
    pool = Pool(out / "images", rng)
    locs = loc_images(pool)
    files: dict[str, list[dict[str, Any]]] = {
        "mmedit/vqa_eval.json": mmedit_records(pool, locs, rng, N_EVAL, "eval", caption=False),
        "mmedit/vqa_train.json": mmedit_records(pool, locs, rng, N_TRAIN, "train", caption=False),
        "mmedit/caption_eval_edit.json": mmedit_records(pool, locs, rng, N_EVAL, "eval", caption=True),
        "mmedit/caption_train_edit.json": mmedit_records(pool, locs, rng, N_TRAIN, "train", caption=True),
    }
    entities = entity_photos(pool, 8)
    files["vlkeb/eval.json"] = vlkeb_records(entities, locs, rng, N_EVAL, "eval")
    files["vlkeb/train.json"] = vlkeb_records(entities, locs, rng, N_TRAIN, "train")
    files["vlkeb/eval_multihop.json"] = vlkeb_records(entities, locs, rng, N_EVAL, "multihop")
    files["vlkeb/eval_edit_onehop.json"] = vlkeb_records(entities, locs, rng, N_EVAL, "onehop")
    for rel, records in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {rel: len(records) for rel, records in files.items()}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m datamodules.sample_data OUT_DIR")
    for rel, n in write(args[0]).items():
        print(f"{rel}: {n} records")


if __name__ == "__main__":
    main()
