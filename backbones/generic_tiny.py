"""Tiny image-text-to-text models with processors and chat templates, for the generic adapter's tests.

Each builder returns (model, processor) exactly as `AutoModelForImageTextToText` / `AutoProcessor`
would load them from a saved directory, so the generic adapter sees the same objects either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from backbones.tiny import TinySpec, byte_tokenizer, tiny_clip_vision_config, tiny_llama_config

# LLaVA-1.5's conversation, written as a chat template: images go in front of the text of a turn.
VICUNA_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_llava(spec: TinySpec) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-1.5: a fixed number of image tokens per image."""
    tokenizer = byte_tokenizer(("<image>",), chat_template=VICUNA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(spec),
        text_config=tiny_llama_config(spec, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava_next(spec: TinySpec) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-NeXT: images are tiled by aspect ratio, so the token count differs per image."""
    tokenizer = byte_tokenizer(("<image>",), chat_template=VICUNA_CHAT_TEMPLATE)
    s = spec.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s]]
    config = LlavaNextConfig(
        vision_config=tiny_clip_vision_config(spec),
        text_config=tiny_llama_config(spec, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    return model, processor


TINY_FAMILIES: dict[str, Callable[[TinySpec], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
}


def build_tiny_image_text_to_text(family: str, spec: TinySpec) -> tuple[PreTrainedModel, ProcessorMixin]:
    return TINY_FAMILIES[family](spec)
