"""Qwen2-VL (and Qwen2VLForConditionalGeneration checkpoints): a native-resolution ViT and a chat LM.

Each image becomes a grid of patches at (close to) its own resolution, so images of different sizes
take different numbers of `<|image_pad|>` tokens: prod(image_grid_thw) / merge_size**2 each. The
model's multimodal rotary positions are computed from `<|vision_start|>` markers and the grids, so
images can sit anywhere in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from backbones.base import VLM
from backbones.batching import ProbeBatch
from backbones.loading import resolve_dtype
from backbones.tiny import TinySpec, byte_tokenizer
from core.case import Probe

QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class Qwen2VLVLM(VLM):
    """Qwen2-VL adapter.

    Args:
        pretrained: a local path or hub name of a Qwen2-VL checkpoint (`Qwen/Qwen2-VL-7B-Instruct`).
        tiny: build a tiny randomly initialised Qwen2-VL instead (tests, CI); exclusive with `pretrained`.
        dtype: float32, bfloat16 or float16.
        trust_remote_code: passed to `from_pretrained`; off unless a config turns it on.
        prompt_format: the instruct model's chat turn, ending where the assistant's answer begins.
        image_text: how the chat template writes one image.
        answer_prefix: empty: the answer opens the assistant turn right after its newline, where the
            chat model's first answer token carries no leading space.
        min_pixels, max_pixels: the image processor's resolution bounds (None keeps the checkpoint's).
        **scoring: the scoring options every backbone shares (`max_batch_size`, `max_new_tokens`,
            `share_prefixes`, `reuse_teacher_forced`), declared and documented once on `VLM`.
            Qwen2-VL accepts `share_prefixes` for uniform configs but does not share prefixes: its
            multimodal rotary positions are computed from the whole row's image grids, and the
            split into a cached prefix and a suffix pass has not been checked against them.
    """

    image_token = "<|image_pad|>"

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        prompt_format: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        image_text: str = "<|vision_start|><|image_pad|><|vision_end|>",
        answer_prefix: str = "",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **scoring: Any,
    ) -> None:
        super().__init__(
            prompt_format,
            image_text,
            answer_prefix,
            **scoring,
        )
        if (pretrained is None) == (tiny is None):
            raise ValueError(
                "Qwen2VLVLM: give exactly one of 'pretrained' (a path or hub name) or 'tiny' (sizes)"
            )
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if pretrained is not None:
            self.model = Qwen2VLForConditionalGeneration.from_pretrained(
                pretrained, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
            )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(pretrained, **bounds)
        else:
            self.model, self.tokenizer, self.image_processor = build_tiny_qwen2_vl(tiny, **bounds)
            self.model.to(resolve_dtype(dtype))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()

    def _encode_text(self, text: str, first: bool) -> list[int]:
        # Qwen's tokenizer adds no BOS, so "first" changes nothing; kept explicit for tokenizers that would.
        return self.tokenizer(text, add_special_tokens=first).input_ids if text or first else []

    def build_batch(self, probes: Sequence[Probe], with_answers: bool = True) -> ProbeBatch:
        batch = super().build_batch(probes, with_answers)
        return add_mm_token_type_ids(batch, self.model.config.image_token_id)

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        merge = self.model.config.vision_config.spatial_merge_size
        return [int(n) for n in image_inputs["image_grid_thw"].prod(-1) // merge**2]

    def vision_modules(self) -> list[nn.Module | nn.Parameter]:
        visual = self.model.model.visual
        # The merger is Qwen2-VL's projector; it lives inside `visual` but belongs to the projector group.
        return [m for name, m in visual.named_children() if name != "merger"]

    def projector_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.model.model.visual.merger]

    def language_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def final_modules(self) -> list[nn.Module] | None:
        # Qwen2VLForConditionalGeneration: the text model's final RMSNorm, then lm_head; nothing after.
        return [self.model.model.language_model.norm, self.model.lm_head]


def add_mm_token_type_ids(batch: ProbeBatch, image_token_id: int) -> ProbeBatch:
    """Mark image tokens (type 1) so the model can lay out its 3-D rotary positions over each image grid.

    The processor would return this next to `input_ids`; prompts here are tokenised by hand, so the
    adapter derives it. Only needed when the batch holds images.
    """
    if "image_grid_thw" in batch.inputs:
        batch.inputs["mm_token_type_ids"] = (batch.inputs["input_ids"] == image_token_id).to(torch.int)
    return batch


def build_tiny_qwen2_vl(
    spec: TinySpec, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[Qwen2VLForConditionalGeneration, object, Qwen2VLImageProcessorPil]:
    tokenizer = byte_tokenizer(QWEN_SPECIAL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    merge = 2
    head_dim = spec.hidden_size // spec.num_heads
    # mrope splits each head's rotary half-dimension over (time, height, width).
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        vision_config={
            "depth": spec.vision_layers,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,
            "mlp_ratio": 2,
            "num_heads": spec.num_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_heads,
            "max_position_embeddings": spec.max_positions,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config)
    factor = spec.patch_size * merge
    # Small bounds so a tiny image keeps a few patches and a large one is scaled down to a few dozen.
    processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=merge,
        temporal_patch_size=2,
        min_pixels=min_pixels if min_pixels is not None else factor * factor,
        max_pixels=max_pixels if max_pixels is not None else (spec.image_size * 2) ** 2,
    )
    return model, tokenizer, processor
