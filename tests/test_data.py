"""The data side: formats, images, lazy decoding, bad-record handling, the sharded sampler, the datamodule."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.dataset import load_edit_dataset
from datamodules.edit_datamodule import EditDataModule
from datamodules.formats import VQA_TEMPLATE
from datamodules.images import ImageLoader, ImageLoadError, to_rgb
from datamodules.records import BadRecordError
from datamodules.sample_data import write as write_sample
from datamodules.sampler import ShardedBatchSampler, batch_bounds

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
IMAGES = SAMPLE / "images"
CORE_KINDS = ("rel", "t_gen", "i_gen", "t_loc", "i_loc")


# --- formats on the shipped sample -------------------------------------------------------------------

SHIPPED = [
    # file, format, port style, prompt template, port hops (sorted set), extra edits per case
    ("mmedit/vqa_eval.json", "mmedit_vqa", None, VQA_TEMPLATE, [], 0),
    ("mmedit/vqa_train.json", "mmedit_vqa", None, VQA_TEMPLATE, [], 0),
    ("mmedit/caption_eval_edit.json", "mmedit_caption", None, "{}", [], 0),
    ("mmedit/caption_train_edit.json", "mmedit_caption", None, "{}", [], 0),
    ("vlkeb/eval.json", "vlkeb", None, "{}", [], 0),
    ("vlkeb/train.json", "vlkeb", None, "{}", [], 0),
    ("vlkeb/eval_multihop.json", "vlkeb", "multihop", "{}", [1, 2, 3, 4], 0),
    ("vlkeb/eval_edit_onehop.json", "vlkeb", "onehop", "{}", [None], 1),
]


@pytest.mark.parametrize("rel_file, fmt, port_style, template, hops, n_extra", SHIPPED)
def test_shipped_files_parse(rel_file, fmt, port_style, template, hops, n_extra):
    file = SAMPLE / rel_file
    records = json.loads(file.read_text(encoding="utf-8"))
    ds = load_edit_dataset(str(file), str(IMAGES))
    info = ds.describe()
    assert (info["format"], info["port_style"], info["prompt_template"]) == (fmt, port_style, template)
    assert info["n_cases"] == info["n_records"] == len(records) and info["n_skipped"] == 0
    loc_template = "{}" if fmt == "vlkeb" else VQA_TEMPLATE
    assert info["loc_image_template"] == loc_template
    seen_hops: set[int | None] = set()
    for i in (0, 1, len(ds) - 1):
        case, rec = ds[i], records[i]
        assert case.case_id == f"{file.stem}:{i}" and case.meta["pred"] == rec["pred"]
        assert all(len(case.probes[k]) == 1 for k in CORE_KINDS)
        assert case.edit is case.probes["rel"][0]
        assert case.edit.prompt == template.replace("{}", rec["src"]) and case.edit.answer == rec["alt"]
        assert case.probes["t_gen"][0].prompt == template.replace("{}", rec["rephrase"])
        assert case.probes["t_loc"][0].prompt == rec["loc"] and case.probes["t_loc"][0].image is None
        i_loc = case.probes["i_loc"][0]
        assert i_loc.prompt == loc_template.replace("{}", rec["m_loc_q"]) and i_loc.answer == rec["m_loc_a"]
        assert len(case.extra_edits) == n_extra
        for probe in case.probes["port"]:
            assert probe.kind == "port" and probe.image is case.edit.image
            seen_hops.add(probe.hop)
        if n_extra:
            item = rec["port_new"][0]
            assert (case.extra_edits[0].prompt, case.extra_edits[0].answer) == (
                item["port_edit_q"],
                item["port_edit_a"],
            )
            assert case.extra_edits[0].image is case.edit.image
            assert case.probes["port"][0].answer == item["port_a"]
    if n_extra:
        assert seen_hops == {None}  # edit-one-hop-then-test: no invented hop count
    assert info["port_hops"] == [h for h in hops if h is not None]


def test_multihop_hop_counts_follow_port_type():
    file = SAMPLE / "vlkeb/eval_multihop.json"
    records = json.loads(file.read_text(encoding="utf-8"))
    ds = load_edit_dataset(str(file), str(IMAGES))
    for i, rec in enumerate(records):
        probes = ds.plans[i].probes["port"]
        assert [p.hop for p in probes] == [int(item["port_type"].split("-")[0]) for item in rec["port_new"]]
        assert [p.answer for p in probes] == [item["Q&A"]["Answer"] for item in rec["port_new"]]


def test_explicit_format_and_templates_override_defaults():
    file = SAMPLE / "mmedit/vqa_eval.json"
    rec = json.loads(file.read_text(encoding="utf-8"))[0]
    raw = load_edit_dataset(str(file), str(IMAGES), format="vlkeb")
    assert raw.format == "vlkeb" and raw.plans[0].edit.prompt == rec["src"]
    custom = load_edit_dataset(str(file), str(IMAGES), prompt_template="Q: {} A:", loc_image_template="{}?")
    assert custom.plans[0].edit.prompt == f"Q: {rec['src']} A:"
    assert custom.plans[0].probes["i_loc"][0].prompt == f"{rec['m_loc_q']}?"
    with pytest.raises(ValueError, match="prompt_template"):
        load_edit_dataset(str(file), str(IMAGES), prompt_template="no placeholder")
    assert len(load_edit_dataset(str(file), str(IMAGES), limit=5)) == 5


def test_sample_script_reproduces_shipped_data(tmp_path):
    write_sample(tmp_path)
    shipped = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == fresh
    assert all((SAMPLE / p).read_bytes() == (tmp_path / p).read_bytes() for p in shipped)
    assert sum((SAMPLE / p).stat().st_size for p in shipped) < 500_000


# --- images ------------------------------------------------------------------------------------------


def _half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent black, right half opaque red (or grey 100 for LA)."""
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (10, 0, 20, 10))
    if mode == "LA":
        grey = Image.new("L", (20, 10), 0)
        grey.paste(100, (10, 0, 20, 10))
        return Image.merge("LA", (grey, img.getchannel("A")))
    if mode == "P+t":
        pal = Image.new("P", (20, 10), 0)
        pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
        pal.paste(1, (10, 0, 20, 10))
        pal.info["transparency"] = 0
        return pal
    return img


MODE_CASES = [
    # name, image factory, file format, {(x, y): expected RGB}
    ("rgb", lambda: Image.new("RGB", (9, 7), (10, 20, 30)), "PNG", {(0, 0): (10, 20, 30)}),
    ("l", lambda: Image.new("L", (9, 7), 128), "PNG", {(0, 0): (128, 128, 128)}),
    ("one_bit", lambda: Image.new("1", (9, 7), 1), "PNG", {(0, 0): (255, 255, 255)}),
    ("rgba", lambda: _half_transparent("RGBA"), "PNG", {(2, 2): (255, 255, 255), (15, 5): (200, 0, 0)}),
    ("la", lambda: _half_transparent("LA"), "PNG", {(2, 2): (255, 255, 255), (15, 5): (100, 100, 100)}),
    (
        "p_transparent",
        lambda: _half_transparent("P+t"),
        "PNG",
        {(2, 2): (255, 255, 255), (15, 5): (200, 0, 0)},
    ),
    ("p", lambda: Image.new("RGB", (9, 7), (0, 0, 255)).quantize(4), "PNG", {(4, 4): (0, 0, 255)}),
    ("i16", lambda: Image.fromarray(np.full((7, 9), 128 * 257, np.uint16)), "PNG", {(0, 0): (128, 128, 128)}),
    ("i32", lambda: Image.fromarray(np.full((7, 9), 65535, np.int32)), "TIFF", {(0, 0): (255, 255, 255)}),
    ("float", lambda: Image.fromarray(np.full((7, 9), 0.5, np.float32)), "TIFF", {(0, 0): (128, 128, 128)}),
    ("cmyk", lambda: Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", {(8, 8): (255, 255, 255)}),
    ("cmyk_red", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", {(8, 8): (255, 0, 0)}),
]


@pytest.mark.parametrize("name, factory, fmt, expected", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_loads_as_rgb(tmp_path, name, factory, fmt, expected):
    img = factory()
    kwargs = {"transparency": 0} if name == "p_transparent" else {}
    img.save(tmp_path / f"{name}.img", fmt, **kwargs)
    out = ImageLoader(tmp_path).load(f"{name}.img")
    assert out.mode == "RGB" and out.size == img.size
    tol = 6 if fmt == "JPEG" else 1
    for xy, rgb in expected.items():
        assert np.abs(np.array(out.getpixel(xy)) - np.array(rgb)).max() <= tol, (name, xy, out.getpixel(xy))


def test_rgb_png_with_colour_key_is_composited_over_white():
    img = Image.new("RGB", (4, 4), (0, 0, 0))
    img.info["transparency"] = (0, 0, 0)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_every_shipped_image_comes_out_rgb():
    loader = ImageLoader(IMAGES)
    modes = set()
    for path in sorted(p for p in IMAGES.rglob("*") if p.is_file()):
        with Image.open(path) as raw:
            modes.add(raw.mode)
        img = loader.load(str(path.relative_to(IMAGES)))
        assert img.mode == "RGB" and 24 <= img.width <= 96 and 24 <= img.height <= 96
        assert np.asarray(img).std() > 0  # a shape on a background, never a blank frame
    assert {"RGB", "L", "LA", "RGBA", "P", "I;16", "CMYK"} <= modes


def test_pixel_guard_and_corrupt_files(tmp_path):
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="max_image_pixels=100"):
        ImageLoader(tmp_path, max_image_pixels=100).load("big.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        ImageLoader(tmp_path).load("junk.jpg")


def _write_records(tmp_path: Path, records: Any, name: str = "vqa_eval.json") -> Path:
    path = tmp_path / name
    path.write_bytes(records if isinstance(records, bytes) else json.dumps(records).encode())
    return path


def test_lazy_decoding_and_per_case_memo(tmp_path, monkeypatch):
    file = SAMPLE / "vlkeb/eval_multihop.json"

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened while loading annotations")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        ds = load_edit_dataset(str(file), str(IMAGES))
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    case = ds[3]
    assert len(opened) == len(set(opened)) == 3  # image, image_rephrase, m_loc; each decoded once
    shared = [case.edit, case.probes["t_gen"][0], *case.probes["port"]]
    assert len(case.probes["port"]) >= 2 and all(p.image is case.edit.image for p in shared)


def test_truncated_image_error_names_file_record_and_field(tmp_path):
    records = json.loads((SAMPLE / "mmedit/vqa_eval.json").read_text(encoding="utf-8"))[:2]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for rec in records:
        for key in ("image", "m_loc"):
            (tmp_path / rec[key]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rec[key]).write_bytes((IMAGES / rec[key]).read_bytes())
    records[1]["image_rephrase"] = "cut.png"
    records[0]["image_rephrase"] = records[0]["image"]
    path = _write_records(tmp_path, records)
    ds = load_edit_dataset(str(path), str(tmp_path))  # the stat check passes: the file exists
    first = ds[0]
    assert first.probes["i_gen"][0].image is first.edit.image  # same path, decoded once
    with pytest.raises(BadRecordError) as err:
        ds[1]
    msg = str(err.value)
    assert (
        "vqa_eval.json" in msg and "record 1" in msg and "field 'image_rephrase'" in msg and "cut.png" in msg
    )


# --- bad input ---------------------------------------------------------------------------------------

BASES = {
    "vqa": ("mmedit/vqa_eval.json", "vqa_eval.json"),
    "multihop": ("vlkeb/eval_multihop.json", "eval_multihop.json"),
    "onehop": ("vlkeb/eval_edit_onehop.json", "eval_edit_onehop.json"),
}


def _set(index: int, key: str, value: Any):
    def mutate(records: list[Any]) -> list[Any]:
        records[index][key] = value
        return records

    return mutate


def _port(index: int, key: str, value: Any, sub: str | None = None):
    def mutate(records: list[Any]) -> list[Any]:
        item = records[index]["port_new"][0]
        target = item[sub] if sub else item
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
        return records

    return mutate


_DELETE = object()


def _ids(*ids: Any):
    def mutate(records: list[Any]) -> list[Any]:
        for rec, id_ in zip(records, ids, strict=True):
            rec["id"] = id_
        return records

    return mutate


def _delete(index: int, key: str):
    def mutate(records: list[Any]) -> list[Any]:
        del records[index][key]
        return records

    return mutate


BAD_INPUTS = [
    # name, base, mutation (records -> records or raw bytes), field, index, message part, skippable
    ("invalid_json", "vqa", lambda r: b'[{"src": ', None, None, "invalid JSON at line 1", False),
    ("not_a_list", "vqa", lambda r: {"records": r}, None, None, "expected a JSON list", False),
    ("non_utf8", "vqa", lambda r: b'[{"src": "caf\xe9"}]', None, None, "not valid UTF-8", False),
    ("record_not_object", "vqa", lambda r: [r[0], "oops", r[2]], None, 1, "expected a JSON object", True),
    ("missing_field", "vqa", _delete(1, "rephrase"), "rephrase", 1, "missing required field", True),
    ("wrong_type", "vqa", _set(1, "alt", 5), "alt", 1, "expected a string, got int", True),
    ("empty_target", "vqa", _set(1, "alt", "  "), "alt", 1, "is empty", True),
    (
        "missing_image",
        "vqa",
        _set(1, "image_rephrase", "coco/nope.png"),
        "image_rephrase",
        1,
        "does not exist",
        True,
    ),
    ("absolute_path", "vqa", _set(1, "m_loc", "/etc/hostname"), "m_loc", 1, "is absolute", True),
    (
        "escaping_path",
        "vqa",
        _set(1, "image", "../../../etc/hostname"),
        "image",
        1,
        "leaves the image root",
        True,
    ),
    ("duplicate_ids", "vqa", _ids("a", "b", "a"), "id", 2, "duplicate case id 'a'", True),
    ("bad_id_type", "vqa", _ids("a", [1], "c"), "id", 1, "string or integer id", True),
    ("hop_type", "multihop", _port(1, "port_type", "many hops"), "port_new[0].port_type", 1, "'1-hop'", True),
    (
        "qa_answer",
        "multihop",
        _port(1, "Answer", _DELETE, "Q&A"),
        "port_new[0].Q&A.Answer",
        1,
        "missing",
        True,
    ),
    ("qa_not_object", "multihop", _port(1, "Q&A", "text"), "port_new[0].Q&A", 1, "Question and Answer", True),
    ("port_not_list", "multihop", _set(1, "port_new", "x"), "port_new", 1, "expected a list", True),
    ("onehop_edit_a", "onehop", _port(1, "port_edit_a", ""), "port_new[0].port_edit_a", 1, "non-empty", True),
    ("port_keys", "onehop", _set(1, "port_new", [{"q": "?"}]), "port_new[0]", 1, "unknown portability", True),
]


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(
    "name, base, mutate, field, index, message, skippable", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(tmp_path, policy, name, base, mutate, field, index, message, skippable):
    source, file_name = BASES[base]
    records = json.loads((SAMPLE / source).read_text(encoding="utf-8"))[:3]
    path = _write_records(tmp_path, mutate(records), file_name)
    if policy == "error" or not skippable:
        with pytest.raises(BadRecordError) as err:
            load_edit_dataset(str(path), str(IMAGES), on_bad_record=policy)
        msg = str(err.value)
        assert str(path) in msg and message in msg, msg
        assert (f"record {index}" in msg) == (index is not None), msg
        assert field is None or f"field {field!r}" in msg, msg
        return
    ds = load_edit_dataset(str(path), str(IMAGES), on_bad_record="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    skip = ds.skipped[0]
    assert (skip["file"], skip["index"], skip["field"]) == (str(path), index, field)
    assert message in skip["message"]
    info = ds.describe()
    assert info["n_skipped"] == 1 and info["n_records"] == 3 and sum(info["skip_reasons"].values()) == 1


def test_undetectable_format_names_the_fields(tmp_path):
    path = _write_records(tmp_path, [{"question": "q", "answer": "a"}], "mystery.json")
    with pytest.raises(BadRecordError, match=r"mystery.json: cannot detect the format .*'question'"):
        load_edit_dataset(str(path), str(IMAGES))


# --- sampler -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [0, 1, 7, 10, 23])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_sharded_sampler_covers_each_item_once(num_items, batch_size):
    reference = list(ShardedBatchSampler(num_items, batch_size, 0, 1))
    assert reference == [list(range(a, b)) for a, b in batch_bounds(num_items, batch_size)]
    for world_size in (1, 2, 3):
        per_rank = [
            list(ShardedBatchSampler(num_items, batch_size, r, world_size)) for r in range(world_size)
        ]
        batches = [b for rank_batches in per_rank for b in rank_batches]
        assert sorted(batches) == reference  # same compositions as one process, nothing padded
        assert sorted(i for b in batches for i in b) == list(range(num_items))
        assert [len(s) for s in per_rank] == [
            len(ShardedBatchSampler(num_items, batch_size, r, world_size)) for r in range(world_size)
        ]
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
        for r, rank_batches in enumerate(per_rank):
            assert rank_batches == reference[r::world_size]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBatchSampler(10, 0)


# --- datamodule --------------------------------------------------------------------------------------


def test_datamodule_interleaves_cross_task():
    dm = EditDataModule(
        annotation_file=str(SAMPLE / "mmedit/vqa_eval.json"),
        image_root=str(IMAGES),
        batch_size=10,
        cross_task_file=str(SAMPLE / "mmedit/caption_train_edit.json"),
    )
    dm.setup("test")
    ids = [dm.dataset[i].case_id for i in range(len(dm.dataset))]
    expected = [
        x for i in range(12) for x in (f"mmedit_vqa/vqa_eval:{i}", f"mmedit_caption/caption_train_edit:{i}")
    ]
    expected += [f"mmedit_caption/caption_train_edit:{i}" for i in range(12, 24)]
    assert ids == expected and len(set(ids)) == 36
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [10, 10, 10, 6]
    assert [c.source for c in batches[0]].count("mmedit_vqa") == 5  # SPEC: 5 E-VQA + 5 E-IC per K = 10
    assert [c.index for b in batches for c in b] == list(range(36))
    info = dm.describe()
    assert info["n_cases"] == 36 and info["cross_task"]["id_prefixes"] == ["mmedit_vqa", "mmedit_caption"]
    assert [d["prompt_template"] for d in info["datasets"]] == [VQA_TEMPLATE, "{}"]
    assert dm.skipped == []


def test_datamodule_shards_by_trainer_rank_and_decodes_in_workers():
    kwargs = dict(
        annotation_file=str(SAMPLE / "vlkeb/eval_multihop.json"), image_root=str(IMAGES), batch_size=2
    )
    ids_by_rank = []
    for rank in range(2):
        dm = EditDataModule(**kwargs, num_workers=1 if rank == 0 else 0, limit=5)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        batches = list(dm.test_dataloader())
        assert all(isinstance(b, list) for b in batches)
        assert all(
            p.image is None or p.image.mode == "RGB" for b in batches for c in b for p in c.all_probes()
        )
        ids_by_rank.append([[c.case_id for c in b] for b in batches])
    assert ids_by_rank == [
        [["eval_multihop:0", "eval_multihop:1"], ["eval_multihop:4"]],
        [["eval_multihop:2", "eval_multihop:3"]],
    ]


class _RecordIds(L.LightningModule):
    """Writes the case ids each rank sees, for the Trainer tests below."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def on_test_start(self) -> None:
        self.seen: list[list[str]] = []

    def test_step(self, batch, batch_idx):
        assert all(p.image is None or p.image.mode == "RGB" for c in batch for p in c.all_probes())
        self.seen.append([c.case_id for c in batch])

    def on_test_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


# Two CPU processes (gloo) take ~30 s to spawn and import: too slow for the default run.
@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_trainer_runs_the_datamodule_without_padding(tmp_path, devices):
    dm = EditDataModule(
        annotation_file=str(SAMPLE / "vlkeb/eval_edit_onehop.json"), image_root=str(IMAGES), batch_size=5
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(_RecordIds(str(tmp_path)), datamodule=dm, verbose=False)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(devices)]
    batches = sorted(b for seen in per_rank for b in seen)
    assert batches == sorted([f"eval_edit_onehop:{i}" for i in range(a, min(a + 5, 12))] for a in (0, 5, 10))
