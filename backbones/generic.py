"""Any `AutoModelForImageTextToText` checkpoint with a chat template, behind the `VLM` interface.

Nothing here knows a family: the prompt layout comes from the processor's chat template, the image
placeholder from the processor's image token, each image's token count from the processor itself
(it expands the placeholder as the model expects), and module paths from a short list of the
attribute layouts transformers uses. A model that fits none of them gets an error naming its class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from backbones.base import VLM
from backbones.batching import ProbeBatch
from backbones.generic_tiny import TINY_FAMILIES, build_tiny_image_text_to_text
from backbones.loading import resolve_dtype
from backbones.tiny import TinySpec
from core.case import Probe

_MARKER = "\u2063CONTENT\u2063"
# Keys the processor returns for the text it was given; the adapter tokenises prompts itself.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})
_LANGUAGE_LAYERS = ("model.language_model.layers", "language_model.model.layers", "language_model.layers")
_VISION = (
    "model.vision_tower",
    "model.visual",
    "model.vision_model",
    "vision_tower",
    "visual",
    "vision_model",
)
_PROJECTOR = (
    "model.multi_modal_projector",
    "model.visual.merger",
    "model.connector",
    "multi_modal_projector",
    "visual.merger",
    "connector",
)
# Model classes whose logits were checked to be the same when a shared prefix runs from a KV cache.
PREFIX_CACHE_MODELS = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)


class ImageInputs(dict):
    """Model image inputs that also remember how many tokens the processor expanded each image to."""

    token_counts: list[int]


class ImageTextToTextVLM(VLM):
    """Generic adapter for image-text-to-text models with a chat template.

    Args:
        pretrained: a local path or hub name loadable by AutoModelForImageTextToText and AutoProcessor.
        tiny: build a tiny randomly initialised model instead (tests, CI); exclusive with `pretrained`.
        family: which tiny architecture to build with `tiny` (one of `TINY_FAMILIES`).
        dtype: float32, bfloat16 or float16.
        trust_remote_code: passed to `from_pretrained`; off unless a config turns it on.
        prompt_format: None derives it from the chat template (one user turn plus the generation prompt).
        image_text: None derives it from how the chat template writes an image.
        answer_prefix: None picks " " when the prompt ends on a word ("ASSISTANT:") and "" when it ends
            on whitespace (a chat turn ending in a newline starts the answer without a space).
        **scoring: the scoring options every backbone shares (`max_batch_size`, `max_new_tokens`,
            `share_prefixes`, `reuse_teacher_forced`), declared and documented once on `VLM`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        family: str = "llava",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        prompt_format: str | None = None,
        image_text: str | None = None,
        answer_prefix: str | None = None,
        **scoring: Any,
    ) -> None:
        if (pretrained is None) == (tiny is None):
            raise ValueError(
                "ImageTextToTextVLM: give exactly one of 'pretrained' (a path or hub name) or 'tiny'"
            )
        if pretrained is not None:
            model = AutoModelForImageTextToText.from_pretrained(
                pretrained, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
            )
            processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        else:
            if family not in TINY_FAMILIES:
                raise ValueError(
                    f"ImageTextToTextVLM: family must be one of {sorted(TINY_FAMILIES)}, got {family!r}"
                )
            model, processor = build_tiny_image_text_to_text(family, tiny)
            model.to(resolve_dtype(dtype))
        token = getattr(processor, "image_token", None)
        if not isinstance(token, str):
            raise ValueError(
                f"ImageTextToTextVLM: the processor {type(processor).__name__} names no image_token"
            )
        # The base class checks image_text against `image_token`, so it must be set before its __init__.
        self.image_token = token
        derived_format, derived_image = chat_layout(processor, token)
        prompt_format = derived_format if prompt_format is None else prompt_format
        if answer_prefix is None:
            answer_prefix = "" if prompt_format.format(content="x")[-1:].isspace() else " "
        super().__init__(
            prompt_format,
            derived_image if image_text is None else image_text,
            answer_prefix,
            **scoring,
        )
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self._wants_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self.model.eval()

    @property
    def supports_prefix_cache(self) -> bool:  # type: ignore[override]
        # Any model could load here; only the classes checked to score the same with a cached
        # prefix qualify (multimodal rotary positions, for one, are laid out over the whole row).
        return isinstance(self.model, PREFIX_CACHE_MODELS) and not self._wants_mm_types

    # ----------------------------------------------------------------- images
    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        # One row per image: the processor expands each placeholder to that image's token count.
        out = self.processor(
            text=[self.image_token] * len(images),
            images=[img.convert("RGB") for img in images],
            padding=True,
            return_tensors="pt",
        )
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        inputs = ImageInputs({k: v for k, v in out.items() if k not in _TEXT_KEYS})
        inputs.token_counts = [int(n) for n in (out["input_ids"] == token_id).sum(-1)]
        return inputs

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        return image_inputs.token_counts

    def build_batch(self, probes: Sequence[Probe], with_answers: bool = True) -> ProbeBatch:
        batch = super().build_batch(probes, with_answers)
        # Models with multimodal rotary positions (Qwen-VL style) need image tokens marked as type 1.
        if self._wants_mm_types and "pixel_values" in batch.inputs:
            token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            batch.inputs["mm_token_type_ids"] = (batch.inputs["input_ids"] == token_id).to(torch.int)
        return batch

    # ----------------------------------------------------------------- module paths
    def _find(self, what: str, paths: Sequence[str]) -> nn.Module:
        for path in paths:
            module: object = self.model
            for attr in path.split("."):
                module = getattr(module, attr, None)
                if module is None:
                    break
            if isinstance(module, nn.Module):
                return module
        raise ValueError(
            f"ImageTextToTextVLM: cannot find the {what} of {type(self.model).__name__} (tried {', '.join(paths)}); "
            "write a family adapter for it in backbones/"
        )

    def vision_modules(self) -> list[nn.Module | nn.Parameter]:
        tower = self._find("vision tower", _VISION)
        projector = self.projector_modules()[0]
        # Some families (Qwen-VL) keep the projector inside the tower; it belongs to the projector group.
        if any(child is projector for child in tower.children()):
            return [child for child in tower.children() if child is not projector]
        return [tower]

    def projector_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self._find("multimodal projector", _PROJECTOR)]

    def language_layers(self) -> nn.ModuleList:
        layers = self._find("language decoder layers", _LANGUAGE_LAYERS)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"ImageTextToTextVLM: the decoder layers of {type(self.model).__name__} are no ModuleList"
            )
        return layers

    def final_modules(self) -> list[nn.Module] | None:
        # The text model holding the decoder layers ends in `norm` in every Llama-like layout; the
        # output embeddings follow. Anything a family does past them (logit soft-capping, extra
        # states added between layers) makes the replay's first loss differ from the full
        # forward's, and the replay then falls back to the whole model (backbones/frozen_prefix.py).
        layers = self.language_layers()
        for path in _LANGUAGE_LAYERS:
            text = self.model
            for attr in path.split(".")[:-1]:
                text = getattr(text, attr, None)
            if getattr(text, "layers", None) is layers and isinstance(getattr(text, "norm", None), nn.Module):
                return [text.norm, self.model.get_output_embeddings()]
        return None


def chat_layout(processor, image_token: str) -> tuple[str, str]:
    """(prompt_format, image_text) read off the chat template of `processor`.

    One user turn holding a marker gives the layout around the content; the same turn with an image
    in front of the marker gives how the template writes an image.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"ImageTextToTextVLM: the processor {type(processor).__name__} has no chat template; "
            "give prompt_format and image_text explicitly"
        )

    def render(content: list[dict]) -> str:
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    text_only = render([{"type": "text", "text": _MARKER}])
    with_image = render([{"type": "image"}, {"type": "text", "text": _MARKER}])
    head, _, tail = text_only.partition(_MARKER)
    image_head = with_image.partition(_MARKER)[0]
    image_text = image_head[len(head) :] if image_head.startswith(head) else ""
    if image_token not in image_text:
        image_text = image_token
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token
    # The base class lets the tokenizer add BOS to the first piece; drop a BOS the template writes too.
    if bos and head.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        head = head[len(bos) :]
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(head) + "{content}" + escape(tail), image_text
