"""LLaVA-1.5 (and any LlavaForConditionalGeneration): a CLIP tower, an MLP projector, a causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from backbones.base import VLM
from backbones.loading import resolve_dtype
from backbones.tiny import TinySpec, byte_tokenizer, tiny_clip_vision_config, tiny_llama_config


class LlavaVLM(VLM):
    """LLaVA adapter.

    Args:
        pretrained: a local path or hub name of a LLaVA checkpoint (`llava-hf/llava-1.5-7b-hf`).
        tiny: build a tiny randomly initialised LLaVA instead (tests, CI); exclusive with `pretrained`.
        dtype: float32, bfloat16 or float16.
        trust_remote_code: passed to `from_pretrained`; off unless a config turns it on.
        random_init: read only the config, tokenizer and processor from `pretrained` and initialise
            the weights randomly, on the GPU when there is one (memory and speed planning for a
            model whose weights are not at hand).
        prompt_format: LLaVA-1.5's conversation format by default.
        **scoring: the scoring options every backbone shares (`max_batch_size`, `max_new_tokens`,
            `share_prefixes`, `reuse_teacher_forced`), declared and documented once on `VLM`.
    """

    image_token = "<image>"
    supports_prefix_cache = True

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        random_init: bool = False,
        prompt_format: str = "USER: {content} ASSISTANT:",
        image_text: str = "<image>\n",
        answer_prefix: str = " ",
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
                "LlavaVLM: give exactly one of 'pretrained' (a path or hub name) or 'tiny' (sizes)"
            )
        if pretrained is not None and random_init:
            config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                self.model = LlavaForConditionalGeneration._from_config(config, dtype=resolve_dtype(dtype))
        if pretrained is not None:
            if not random_init:
                self.model = LlavaForConditionalGeneration.from_pretrained(
                    pretrained, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
                )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            self.image_processor = CLIPImageProcessorPil.from_pretrained(pretrained)
        else:
            self.model, self.tokenizer, self.image_processor = build_tiny_llava(tiny)
            self.model.to(resolve_dtype(dtype))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.model.eval()

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        }

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        cfg = self.model.config
        side = image_inputs["pixel_values"].shape[-1] // cfg.vision_config.patch_size
        # The "default" strategy drops the CLS token; "full" keeps it.
        per_image = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        return [per_image] * image_inputs["pixel_values"].shape[0]

    def vision_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.model.model.vision_tower]

    def projector_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.model.model.multi_modal_projector]

    def language_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def final_modules(self) -> list[nn.Module] | None:
        # LlavaForConditionalGeneration: the text model's final RMSNorm, then lm_head; nothing after.
        return [self.model.model.language_model.norm, self.model.lm_head]


def build_tiny_llava(spec: TinySpec) -> tuple[LlavaForConditionalGeneration, object, CLIPImageProcessorPil]:
    tokenizer = byte_tokenizer(("<image>",))
    vision = tiny_clip_vision_config(spec)
    text = tiny_llama_config(spec, tokenizer)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return model, tokenizer, processor
