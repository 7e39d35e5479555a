"""BLIP-2 family: a vision tower, a Q-Former with learned queries, a projection, any causal LM.

`Blip2FamilyVLM` holds everything the family shares; `Blip2OptVLM` (BLIP-2 with OPT) and
`MiniGPT4VLM` (in `minigpt4.py`, the same architecture with a Llama/Vicuna LM) only change their
defaults. Transformers 5 scatters the Q-Former outputs into the positions of `config.image_token_id`
tokens, so each image takes `num_query_tokens` image tokens and may sit anywhere in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    PretrainedConfig,
)

from backbones.base import VLM
from backbones.loading import resolve_dtype
from backbones.tiny import TinySpec, byte_tokenizer


class Blip2AnyPrompt(Blip2ForConditionalGeneration):
    """Blip2ForConditionalGeneration that also takes batches without any image.

    The upstream forward and generate require `pixel_values`; text-only locality probes (T-Loc)
    go straight to the language model, which is exactly what BLIP-2 does with no query tokens.
    The class adds no weights, so checkpoints load and save unchanged.
    """

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        if pixel_values is None:
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return super().forward(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        if pixel_values is None:
            return self.language_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return super().generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )


class Blip2FamilyVLM(VLM):
    """Shared adapter of BLIP-2-shaped models; subclasses set the family's defaults as class attributes.

    Args:
        pretrained: a local path or hub name of a Blip2ForConditionalGeneration checkpoint whose
            tokenizer holds the image token and whose config sets `image_token_id`.
        tiny: build a tiny randomly initialised model instead (tests, CI); exclusive with `pretrained`.
        dtype: float32, bfloat16 or float16.
        trust_remote_code: passed to `from_pretrained`; off unless a config turns it on.
        prompt_format, image_text, answer_prefix: the family's defaults when left as None.
        **scoring: the scoring options every backbone shares (`max_batch_size`, `max_new_tokens`,
            `share_prefixes`, `reuse_teacher_forced`), declared and documented once on `VLM`.
    """

    image_token = "<image>"
    # Checked with OPT and Llama language models: the query tokens are scattered into the placeholder
    # run of each image, and the LM's positions follow the attention mask / explicit position ids.
    supports_prefix_cache = True
    default_prompt_format: str = "{content}"
    default_image_text: str = "<image>"
    default_answer_prefix: str = " "

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        prompt_format: str | None = None,
        image_text: str | None = None,
        answer_prefix: str | None = None,
        **scoring: Any,
    ) -> None:
        super().__init__(
            self.default_prompt_format if prompt_format is None else prompt_format,
            self.default_image_text if image_text is None else image_text,
            self.default_answer_prefix if answer_prefix is None else answer_prefix,
            **scoring,
        )
        name = type(self).__name__
        if (pretrained is None) == (tiny is None):
            raise ValueError(
                f"{name}: give exactly one of 'pretrained' (a path or hub name) or 'tiny' (sizes)"
            )
        if pretrained is not None:
            self.check_pretrained(pretrained)
            self.model = Blip2AnyPrompt.from_pretrained(
                pretrained, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
            )
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
            self.image_processor = BlipImageProcessorPil.from_pretrained(pretrained)
        else:
            self.model, self.tokenizer, self.image_processor = build_tiny_blip2(tiny, self.tiny_text_config)
            self.model.to(resolve_dtype(dtype))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if (
            token_id is None
            or token_id == self.tokenizer.unk_token_id
            or token_id != self.model.config.image_token_id
        ):
            raise ValueError(
                f"{name}: the tokenizer of {pretrained!r} maps {self.image_token!r} to {token_id} but the model's "
                f"config.image_token_id is {self.model.config.image_token_id}; use a checkpoint converted for "
                "transformers>=4.47 (the tokenizer holds the image token and the config names its id)"
            )
        self.model.eval()
        self._bos_pending = False

    # ----------------------------------------------------------------- family defaults
    def check_pretrained(self, pretrained: str) -> None:
        """Validate `pretrained` before loading; families without a hub checkpoint override this."""

    @staticmethod
    def tiny_text_config(spec: TinySpec, tokenizer) -> PretrainedConfig:
        return OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            ffn_dim=spec.ffn_size,
            word_embed_proj_dim=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    # ----------------------------------------------------------------- VLM hooks
    def _encode_text(self, text: str, first: bool) -> list[int]:
        # BLIP-2 (LAVIS and the HF processor) puts the query tokens before BOS: [image][BOS][prompt].
        # So BOS goes in front of the first text token, even when the prompt opens with an image.
        if first:
            self._bos_pending = not text
            return self.tokenizer(text, add_special_tokens=True).input_ids if text else []
        if not text:
            return []
        add_bos, self._bos_pending = self._bos_pending, False
        return self.tokenizer(text, add_special_tokens=add_bos).input_ids

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        }

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        return [self.model.config.num_query_tokens] * image_inputs["pixel_values"].shape[0]

    def vision_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.model.vision_model]

    def projector_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.model.qformer, self.model.query_tokens, self.model.language_projection]

    def language_layers(self) -> nn.ModuleList:
        return self.model.language_model.get_decoder().layers

    def final_modules(self) -> list[nn.Module] | None:
        decoder = self.model.language_model.get_decoder()
        head = self.model.language_model.get_output_embeddings()
        if hasattr(decoder, "norm"):  # Llama-style LM (MiniGPT-4): final RMSNorm, then lm_head
            return [decoder.norm, head]
        if hasattr(decoder, "final_layer_norm"):
            # OPT: final LayerNorm and the projection back to the embedding width, each only where
            # the config has one (None otherwise), then lm_head.
            return [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None] + [head]
        return None

    def ffn(self, layer: int) -> nn.Module:
        """Llama-style layers have `.mlp`; OPT keeps fc1/fc2 on the layer, and fc2's output is the FFN's."""
        block = self.language_layers()[layer]
        return block.mlp if hasattr(block, "mlp") else block.fc2

    def ffn_members(self, layer: int) -> list[nn.Module | nn.Parameter]:
        block = self.language_layers()[layer]
        # OPT's FFN is fc1 -> activation -> fc2; its pre-FFN norm stays out, as Llama's does from `.mlp`.
        return [block.mlp] if hasattr(block, "mlp") else [block.fc1, block.fc2]


class Blip2OptVLM(Blip2FamilyVLM):
    """BLIP-2 with an OPT language model (`Salesforce/blip2-opt-2.7b`): image first, then the text."""


def build_tiny_blip2(spec: TinySpec, text_config_fn) -> tuple[Blip2AnyPrompt, object, BlipImageProcessorPil]:
    tokenizer = byte_tokenizer(("<image>",))
    vision = Blip2VisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=1,
        num_attention_heads=spec.num_heads,
        encoder_hidden_size=spec.vision_hidden_size,
        cross_attention_frequency=1,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text_config_fn(spec, tokenizer),
        num_query_tokens=spec.num_query_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(spec.seed)
    model = Blip2AnyPrompt(config)
    processor = BlipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    return model, tokenizer, processor
