"""UniKE's knowledge side: triplet mining, pre-attention states, and their caches (`knowledge/`).

The backbone is a small, randomly initialised world LLaVA (the world's word tokenizer, so answers are
one word); the questions are the tiny world's withheld facts on a few pool renderings and the Rel
questions of its editor-training split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.case import Probe
from knowledge import KnowledgeStoreError, extract_states, load_knowledge_states
from knowledge.mine import main as mine_main
from knowledge.mine import mine_triplets
from knowledge.sources import AnnotationSource, WithheldSource
from knowledge.store import KEY_FILE
from metrics.functional import exact_match
from world.backbones import WorldLlavaVLM, WorldSpec, load_world
from world.build import build_world
from world.config import load_world_config
from world.render import render

#: Tiny models: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"hidden_size": 32, "num_layers": 2, "vision_hidden_size": 32, "vision_layers": 1, "num_heads": 2}
#: The same backbone but wider: what the cached states must be refused for.
OTHER_SPEC = {**SPEC, "hidden_size": 48}
LAYERS = [-2, -1]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), out, verbose=False)
    return out


@pytest.fixture(scope="module")
def vlm(tiny_world):
    model = WorldLlavaVLM(world_dir=str(tiny_world), spec=WorldSpec(**SPEC))
    model.requires_grad_(False)
    return model


def mine_config(world: Path, out: Path, spec: dict, file: Path | None = None) -> dict:
    """What a `configs/knowledge/*.yaml` holds, for the tiny world: 3 renderings, the train split's Rel."""
    return {
        "backbone": {
            "class_path": "world.backbones.WorldLlavaVLM",
            "init_args": {"world_dir": str(world), "spec": spec},
        },
        "out": str(out),
        "withheld": {"world_dir": str(world), "renderings": 3},
        "annotations": [
            {
                "file": str(file or world / "mmedit" / "vqa_train.json"),
                "image_root": str(world / "images"),
                "format": "mmedit_vqa",
                "prompt_template": "{}",
                "loc_image_template": "{}",
                "kinds": ["rel"],
            }
        ],
        "layers": LAYERS,
        "chunk_size": 64,
        "progress": False,
    }


def run_mine(tmp: Path, config: dict, *extra: str) -> dict:
    path = tmp / f"mine_{len(list(tmp.glob('mine_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return mine_main(["--config", str(path), *extra])


@pytest.fixture(scope="module")
def mined(tiny_world, tmp_path_factory) -> tuple[Path, dict]:
    """`python -m knowledge.mine` on the tiny world (a few seconds): the knowledge folder and the summary."""
    tmp = tmp_path_factory.mktemp("knowledge")
    out = tmp / "out"
    return out, run_mine(tmp, mine_config(tiny_world, out, SPEC))


def one_line_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


# ----------------------------------------------------------------- mining


def test_mining_keeps_exactly_the_wrong_answers_with_the_models_answer(
    tiny_world, vlm, tmp_path, monkeypatch
):
    questions, _ = WithheldSource(str(tiny_world), renderings=2).questions(tmp_path / "images")
    probes = [Probe(q.prompt, q.answer, q.picture()) for q in questions]
    # Every greedy answer decoded (no reuse of the teacher-forced pass): the reference the miner must match.
    decoded = vlm.generate(probes)
    # A random model is wrong nearly always; make it right on every third question, so that "keeps
    # exactly the wrong ones" is tested on both kinds.
    forced = {i: (p.answer if i % 3 == 0 else decoded[i]) for i, p in enumerate(probes)}
    real_generate = vlm.generate

    def generate(chunk, teacher_forced=None):
        answers = real_generate(chunk, teacher_forced=teacher_forced)
        return [
            forced[index[(p.prompt, p.image.tobytes())]] if p.image else a
            for p, a in zip(chunk, answers, strict=True)
        ]

    index = {(p.prompt, p.image.tobytes()): i for i, p in enumerate(probes)}
    assert len(index) == len(probes)
    monkeypatch.setattr(vlm, "generate", generate)
    rows, counts = mine_triplets(vlm, questions, chunk_size=16, progress=False)
    expected = [i for i, p in enumerate(probes) if not exact_match(forced[i], p.answer)]
    assert 0 < len(expected) < len(probes)
    assert rows["key"] == [questions[i].key for i in expected]
    assert rows["a_neg"] == [forced[i].strip() for i in expected]
    assert rows["a_pos"] == [questions[i].answer for i in expected]
    assert rows["question"] == [questions[i].prompt for i in expected]
    c = counts["world_withheld"]
    assert (c.asked, c.right, c.wrong, c.kept) == (
        len(probes),
        len(probes) - len(expected),
        len(expected),
        len(expected),
    )
    # Kept triplets' pictures were written: the same pixels as the in-memory rendering.
    world = load_world(tiny_world)
    first = questions[expected[0]]
    entity, rid = first.key.split("/")[1], int(first.key.split("/")[3])
    written = np.asarray(Image.open(first.image).convert("RGB"))
    drawn = np.asarray(render(world.entity(entity).look, world.config, entity, rid))
    assert np.array_equal(written, drawn)


def test_mine_command_writes_triplets_and_counts(mined, tiny_world):
    out, summary = mined
    triplets = datasets.load_from_disk(str(out / "triplets"))
    assert {"question", "image", "a_pos", "a_neg", "source", "key", "fact"} <= set(triplets.column_names)
    key = json.loads((out / "triplets" / KEY_FILE).read_text())
    counts = key["counts"]
    withheld, _ = WithheldSource(str(tiny_world), renderings=3).questions(out / "images")
    annotation, _, _ = AnnotationSource(
        str(tiny_world / "mmedit" / "vqa_train.json"),
        str(tiny_world / "images"),
        "mmedit_vqa",
        "{}",
        "{}",
        ["rel"],
    ).questions()
    assert counts["world_withheld"]["asked"] == len(withheld)
    assert counts["vqa_train.json:rel"]["asked"] == len(annotation)
    assert sum(c["kept"] for c in counts.values()) == len(triplets) == summary["mine"]["n_triplets"] > 0
    assert set(triplets["source"]) <= {"world_withheld", "vqa_train.json:rel"}
    # Every kept row is wrong and carries a picture that exists.
    assert all(not exact_match(n, p) for n, p in zip(triplets["a_neg"], triplets["a_pos"], strict=True))
    assert all(Path(p).is_file() for p in triplets["image"])
    # The folder keeps itself out of git.
    assert (out / ".gitignore").read_text().strip().endswith("*")


# ----------------------------------------------------------------- states


def direct_pre_attention(vlm, probe: Probe, layer: int, with_answer: bool) -> torch.Tensor:
    """The last token's input to layer `layer`'s attention, read by a hook of this test on one unbatched row."""
    seen = {}

    def hook(_module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    attention = vlm.language_layers()[layer].self_attn
    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            batch = vlm.build_batch([probe], with_answers=with_answer)
            out = vlm.model(**batch.inputs, output_hidden_states=True)
    finally:
        handle.remove()
    # The same state the long way: the layer's input norm applied to the residual stream it receives.
    residual = out.hidden_states[layer % vlm.num_language_layers]
    normed = vlm.language_layers()[layer].input_layernorm(residual)
    torch.testing.assert_close(seen["h"], normed)
    return seen["h"][0, -1]


def test_states_are_the_pre_attention_inputs_at_the_last_prompt_and_answer_tokens(vlm, tiny_world, tmp_path):
    questions, _ = WithheldSource(str(tiny_world), renderings=1).questions(tmp_path)
    questions = questions[:5]
    probes = [Probe(q.prompt, "ignored", q.picture()) for q in questions]
    pos = [q.answer for q in questions]
    neg = ["Nobody", "glass", "wood", "stone", "x"]  # "x" is no world word: it becomes <unk>, still a token
    states = extract_states(vlm, probes, pos, neg, LAYERS)
    assert set(states) == {"sem", "pos", "neg"}
    for layer in LAYERS:
        assert (
            states["sem"][layer].shape == (5, SPEC["hidden_size"])
            and states["sem"][layer].dtype == torch.float32
        )
        for i, probe in enumerate(probes):
            sem = direct_pre_attention(vlm, probe, layer, with_answer=False)
            torch.testing.assert_close(states["sem"][layer][i], sem, atol=1e-5, rtol=1e-4)
            for kind, answers in (("pos", pos), ("neg", neg)):
                end = direct_pre_attention(vlm, Probe(probe.prompt, answers[i], probe.image), layer, True)
                torch.testing.assert_close(states[kind][layer][i], end, atol=1e-5, rtol=1e-4)
    # Without negatives, "neg" is empty; states of an empty list are empty.
    assert extract_states(vlm, probes[:1], pos[:1], None, LAYERS)["neg"] == {}
    assert extract_states(vlm, [], [], [], LAYERS)["sem"][-1].shape == (0, SPEC["hidden_size"])
    with pytest.raises(ValueError, match="out of range"):
        extract_states(vlm, probes[:1], pos[:1], None, [5])
    with pytest.raises(ValueError, match="twice"):
        extract_states(vlm, probes[:1], pos[:1], None, [1, -1])


def test_cached_states_match_a_fresh_extraction_and_are_reused(mined, vlm, tiny_world, tmp_path):
    out, summary = mined
    assert summary["states"]["reused"] is False
    states = load_knowledge_states(out, vlm)
    triplets = datasets.load_from_disk(str(out / "triplets"))
    assert len(states) == len(triplets) and states.layers == LAYERS and states.keys == triplets["key"]
    rows = triplets.select(range(4))
    probes = [
        Probe(q, "", Image.open(p).convert("RGB"))
        for q, p in zip(rows["question"], rows["image"], strict=True)
    ]
    fresh = extract_states(vlm, probes, rows["a_pos"], rows["a_neg"], LAYERS)
    for kind in ("sem", "pos", "neg"):
        for layer in LAYERS:
            torch.testing.assert_close(
                getattr(states, kind)[layer][:4], fresh[kind][layer], atol=1e-5, rtol=1e-4
            )
    # The same command again: both stages come from the cache.
    again = run_mine(tmp_path, mine_config(tiny_world, out, SPEC))
    assert again["mine"]["reused"] and again["states"]["reused"]
    assert again["mine"]["n_triplets"] == summary["mine"]["n_triplets"]


def test_another_backbone_is_refused_in_one_line(mined, tiny_world, tmp_path, capsys):
    out, _ = mined
    other = WorldLlavaVLM(world_dir=str(tiny_world), spec=WorldSpec(**OTHER_SPEC))
    with pytest.raises(KnowledgeStoreError, match="another backbone") as info:
        load_knowledge_states(out, other)
    assert str(out / "states") in str(info.value) and "hidden_size" in str(info.value)
    for stage in ("all", "states"):
        with pytest.raises(SystemExit) as exit_info:
            run_mine(tmp_path, mine_config(tiny_world, out, OTHER_SPEC), "--stage", stage)
        assert exit_info.value.code == 2
        line = one_line_error(capsys)
        assert str(out / "triplets") in line and "backbone hidden_size" in line


def test_bad_inputs_give_one_error_naming_the_file(mined, tiny_world, tmp_path, capsys):
    out, _ = mined
    missing = tmp_path / "nowhere"
    with pytest.raises(KnowledgeStoreError, match=str(missing)):
        load_knowledge_states(missing)
    # A states folder without one of its columns.
    broken = tmp_path / "broken"
    datasets.load_from_disk(str(out / "states")).remove_columns(["pos_-1"]).save_to_disk(
        str(broken / "states")
    )
    shutil.copy(out / "states" / KEY_FILE, broken / "states" / KEY_FILE)
    with pytest.raises(KnowledgeStoreError, match="pos_-1") as info:
        load_knowledge_states(broken)
    assert str(broken / "states") in str(info.value)
    # A folder that was never finished (no key file).
    (broken / "states" / KEY_FILE).unlink()
    with pytest.raises(KnowledgeStoreError, match="no finished"):
        load_knowledge_states(broken)
    # A triplets folder without a_neg: the states stage names it.
    triplets = datasets.load_from_disk(str(out / "triplets")).remove_columns(["a_neg"])
    triplets.save_to_disk(str(broken / "triplets"))
    shutil.copy(out / "triplets" / KEY_FILE, broken / "triplets" / KEY_FILE)
    with pytest.raises(SystemExit):
        run_mine(tmp_path, mine_config(tiny_world, broken, SPEC), "--stage", "states")
    line = one_line_error(capsys)
    assert str(broken / "triplets") in line and "a_neg" in line
    # A missing annotation file: the loader's one-line error names it.
    absent = tmp_path / "absent.json"
    with pytest.raises(SystemExit):
        run_mine(tmp_path, mine_config(tiny_world, tmp_path / "fresh", SPEC, file=absent))
    assert str(absent) in one_line_error(capsys)
