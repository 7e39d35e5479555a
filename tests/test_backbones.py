"""Every backbone family, built tiny from its config, behaves the same behind the `VLM` interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image
from tiny_families import FAMILIES

from backbones import (
    VLM,
    Blip2OptVLM,
    ImageTextToTextVLM,
    LlavaVLM,
    MiniGPT4VLM,
    Qwen2VLVLM,
    TinySpec,
)
from core.case import ContextItem, Probe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "backbones"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request) -> VLM:
    return FAMILIES[request.param]()


def image(
    size: tuple[int, int], mode: str = "RGB", color: tuple[int, int, int] = (200, 40, 30)
) -> Image.Image:
    img = Image.new("RGB", size, color)
    return img if mode == "RGB" else img.convert(mode)


def probes() -> list[Probe]:
    """Text-only, images of several sizes and modes, and a demonstration carrying its own image."""
    return [
        Probe("Where is this landmark?", "Rome", image((48, 40))),
        Probe("Who wrote Hamlet?", "Shakespeare"),
        Probe("What colour is this?", "blue", image((30, 64), "L", (20, 20, 220))),
        Probe("And this one?", "red", image((64, 32), "RGBA")),
        Probe(
            "Where is it?",
            "Paris",
            image((33, 33), "P"),
            context=(ContextItem("Rome is in Italy.", image((40, 48))),),
        ),
    ]


def test_teacher_forced_covers_every_answer_token(vlm: VLM) -> None:
    batch_probes = probes()
    outs = vlm.teacher_forced(batch_probes)
    assert len(outs) == len(batch_probes)
    for probe, out in zip(batch_probes, outs, strict=True):
        answer = vlm.encode_answer(probe.answer)
        assert out.labels.tolist() == answer
        assert out.pred.shape == out.labels.shape


def test_batched_scores_match_single_probes(vlm: VLM) -> None:
    # Padding and the other probes' images must not change a probe's logits.
    batch_probes = probes()
    together = vlm.teacher_forced(batch_probes)
    for probe, joint in zip(batch_probes, together, strict=True):
        alone = vlm.teacher_forced([probe])[0]
        assert torch.equal(alone.pred, joint.pred)


def test_answer_span_labels_equal_tokenised_answer(vlm: VLM) -> None:
    batch_probes = probes()
    batch = vlm.build_batch(batch_probes)
    for i, probe in enumerate(batch_probes):
        s, e = batch.answer_spans[i]
        answer = vlm.encode_answer(probe.answer)
        assert batch.labels[i, s:e].tolist() == answer
        assert batch.inputs["input_ids"][i, s:e].tolist() == answer
        assert (batch.labels[i, :s] == -100).all() and (batch.labels[i, e:] == -100).all()


def test_multi_image_probe_places_every_image(vlm: VLM) -> None:
    probe = probes()[-1]
    text, images = vlm.render_prompt(probe)
    assert len(images) == 2 and text.count(vlm.image_token) == 2
    batch = vlm.build_batch([probe])
    token_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
    counts = vlm.image_token_counts(vlm.image_inputs(images))
    assert int((batch.inputs["input_ids"] == token_id).sum()) == sum(counts)


def test_generate_returns_strings(vlm: VLM) -> None:
    texts = vlm.generate(probes())
    assert len(texts) == len(probes()) and all(isinstance(t, str) for t in texts)
    assert all(isinstance(t, str) for t in vlm.generate([Probe("Who wrote Hamlet?", "Shakespeare")]))


def test_embed_shape(vlm: VLM) -> None:
    vectors = vlm.embed(probes())
    hidden = vlm.model.config.get_text_config().hidden_size
    assert vectors.shape == (len(probes()), hidden)
    assert torch.isfinite(vectors).all()


def test_loss_reaches_ffn_and_projector(vlm: VLM) -> None:
    ffn = vlm.parameter_group("ffn:-1")
    projector = vlm.parameter_group("projector")
    assert ffn and projector and not set(ffn) & set(projector)
    assert not set(projector) & set(vlm.parameter_group("vision"))
    vlm.zero_grad(set_to_none=True)
    vlm.loss(probes()[:3]).backward()
    for group in (ffn, projector):
        grads = [p.grad for p in group.values()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    vlm.zero_grad(set_to_none=True)


def test_ffn_group_is_exactly_the_last_feed_forward_block(vlm: VLM) -> None:
    names = list(vlm.parameter_group("ffn:-1"))
    last = vlm.num_language_layers - 1
    assert all(f"layers.{last}." in n for n in names)
    assert not any("attn" in n or "norm" in n for n in names)


def test_capture_hidden(vlm: VLM) -> None:
    batch = vlm.build_batch(probes()[:2])
    with vlm.capture_hidden([0, -1]) as hidden, torch.no_grad():
        vlm.logits(batch)
    assert set(hidden) == {0, -1}
    assert hidden[-1].shape[:2] == batch.inputs["input_ids"].shape


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_same_weights(family: str) -> None:
    a, b = FAMILIES[family](seed=3).model.state_dict(), FAMILIES[family](seed=3).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(vlm: VLM, path: Path) -> None:
    vlm.model.save_pretrained(path)
    if hasattr(vlm, "processor"):
        vlm.processor.save_pretrained(path)
    else:
        vlm.tokenizer.save_pretrained(path)
        vlm.image_processor.save_pretrained(path)


def test_loads_through_from_pretrained(vlm: VLM, tmp_path: Path) -> None:
    _save(vlm, tmp_path)
    loaded = type(vlm)(pretrained=str(tmp_path))
    assert loaded.prompt_format == vlm.prompt_format and loaded.image_text == vlm.image_text
    batch_probes = probes()
    with torch.no_grad():
        expected = vlm.logits(vlm.build_batch(batch_probes))
        got = loaded.logits(loaded.build_batch(batch_probes))
    torch.testing.assert_close(got, expected)


def test_minigpt4_needs_a_local_checkpoint() -> None:
    with pytest.raises(ValueError, match="local directory"):
        MiniGPT4VLM(
            pretrained=yaml.safe_load((CONFIG_DIR / "minigpt4_vicuna_7b.yaml").read_text())["init_args"][
                "pretrained"
            ]
        )


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_backbone_configs_parse(path: Path) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLM, "backbone")
    cfg = parser.parse_args(["--backbone", str(path)])
    if path.name.startswith("tiny_"):
        backbone = parser.instantiate_classes(cfg).backbone
        assert isinstance(backbone, VLM) and backbone.teacher_forced(probes()[:2])


def test_llava_random_init_reads_only_the_config(tmp_path: Path) -> None:
    """`random_init` builds the architecture of a checkpoint folder that holds no weights."""
    from backbones import LlavaVLM, TinySpec

    tiny = LlavaVLM(tiny=TinySpec(hidden_size=64, num_layers=3))
    tiny.model.config.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    tiny.image_processor.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    vlm = LlavaVLM(pretrained=str(tmp_path), random_init=True)
    assert vlm.num_language_layers == 3
    assert {k: v.shape for k, v in vlm.model.state_dict().items()} == {
        k: v.shape for k, v in tiny.model.state_dict().items()
    }
    out = vlm.teacher_forced([Probe("What is it?", "a cat", image((40, 30)))])
    assert len(out) == 1 and out[0].pred.shape == out[0].labels.shape


@pytest.mark.parametrize(
    "build",
    [
        LlavaVLM,
        Blip2OptVLM,
        MiniGPT4VLM,
        Qwen2VLVLM,
        lambda tiny: ImageTextToTextVLM(tiny=tiny, family="llava_next"),
    ],
    ids=["llava", "blip2_opt", "minigpt4", "qwen2_vl", "generic_llava_next"],
)
def test_tiny_spec_shapes_the_language_model(build) -> None:
    # Benchmarks shape real models with these (LLaVA-1.5-7B: 11008-wide MLPs, 4096 positions).
    vlm = build(tiny=TinySpec(intermediate_size=48, max_positions=2048))
    text = vlm.model.config.get_text_config()
    assert (getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)) == 48
    assert vlm.max_positions() == 2048
