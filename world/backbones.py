"""World-sized LLaVA-style and BLIP-2-style backbones, built from scratch with the world's tokenizer.

These are the same adapters as `LlavaVLM` / `Blip2OptVLM` (same prompt layout, same batching), only
built from sizes and a world folder instead of a checkpoint. After training, `save_pretrained` writes a
folder that `LlavaVLM(pretrained=PATH)` / `Blip2OptVLM(pretrained=PATH)` load like a real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
)

from backbones.base import VLM
from backbones.blip2 import Blip2AnyPrompt, Blip2OptVLM
from backbones.llava import LlavaVLM
from world.generate import World
from world.tokenizer import IMAGE_TOKEN, build_tokenizer


@dataclass
class WorldSpec:
    """Sizes of a world backbone (the feasibility runs' LLaVA: 2x128 CLIP tower, 4x128 Llama, ~1.2M).

    Args:
        hidden_size, num_layers: language model width and depth.
        vision_hidden_size, vision_layers: vision tower width and depth.
        num_heads: attention heads of every tower.
        patch_size: 8 on 32x32 images gives 16 patch tokens.
        num_query_tokens: Q-Former queries (BLIP-2 style only).
        mlp_ratio: feed-forward width over hidden width; 2 gives the feasibility runs' ~1.2M parameters
            (4 cost a third more time per step for no gain we could measure).
        seed: initialisation seed.
    """

    hidden_size: int = 128
    num_layers: int = 4
    vision_hidden_size: int = 128
    vision_layers: int = 2
    num_heads: int = 4
    patch_size: int = 8
    num_query_tokens: int = 8
    mlp_ratio: int = 2
    seed: int = 0


def load_world(world_dir: str | Path, world_config: str | None = None) -> World:
    """The world in `world_dir`; with `world_config` it is built there first (cached, see world.build)."""
    if world_config is not None:
        from world.build import build_world
        from world.config import load_world_config

        build_world(load_world_config(world_config), world_dir)
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the world first (python -m world.build --out {world_dir})"
        )
    return World.from_dict(json.loads(path.read_text()))


def _vision_kwargs(spec: WorldSpec, image_size: int) -> dict:
    """The vision tower's sizes, shared by the CLIP (LLaVA) and BLIP-2 towers."""
    return {
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_hidden_size * spec.mlp_ratio,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.num_heads,
        "image_size": image_size,
        "patch_size": spec.patch_size,
    }


def _text_kwargs(spec: WorldSpec, tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


class WorldLlavaVLM(LlavaVLM):
    """A LLaVA-style world backbone: CLIP tower, MLP projector, Llama, the world's word tokenizer.

    Args:
        world_dir: a folder written by `world.build` (its world.json gives the vocabulary and image size).
        spec: sizes.
        world_config: a world YAML to build `world_dir` from when it is missing or stale.
    """

    def __init__(
        self, world_dir: str, spec: WorldSpec | None = None, world_config: str | None = None
    ) -> None:
        VLM.__init__(self, "USER: {content} ASSISTANT:", "<image>\n", " ", 64, 0)
        spec = spec or WorldSpec()
        world = load_world(world_dir, world_config)
        size = world.config.image_size
        self.tokenizer = build_tokenizer(world)
        vision = CLIPVisionConfig(**_vision_kwargs(spec, size))
        kwargs = _text_kwargs(spec, self.tokenizer)
        text = LlamaConfig(
            **kwargs, intermediate_size=spec.hidden_size * spec.mlp_ratio, num_key_value_heads=spec.num_heads
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )
        torch.manual_seed(spec.seed)
        self.model = LlavaForConditionalGeneration(config)
        self.image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        self.model.eval()


class WorldBlip2VLM(Blip2OptVLM):
    """A BLIP-2-style world backbone: ViT, Q-Former with learned queries, OPT, the world's word tokenizer.

    Args: as `WorldLlavaVLM`.
    """

    def __init__(
        self, world_dir: str, spec: WorldSpec | None = None, world_config: str | None = None
    ) -> None:
        VLM.__init__(
            self, self.default_prompt_format, self.default_image_text, self.default_answer_prefix, 64, 0
        )
        spec = spec or WorldSpec()
        world = load_world(world_dir, world_config)
        size = world.config.image_size
        self.tokenizer = build_tokenizer(world)
        vision = Blip2VisionConfig(**_vision_kwargs(spec, size))
        qformer = Blip2QFormerConfig(
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * spec.mlp_ratio,
            num_hidden_layers=2,
            num_attention_heads=spec.num_heads,
            encoder_hidden_size=spec.vision_hidden_size,
            cross_attention_frequency=1,
        )
        kwargs = _text_kwargs(spec, self.tokenizer)
        text = OPTConfig(
            **kwargs, ffn_dim=spec.hidden_size * spec.mlp_ratio, word_embed_proj_dim=spec.hidden_size
        )
        config = Blip2Config(
            vision_config=vision,
            qformer_config=qformer,
            text_config=text,
            num_query_tokens=spec.num_query_tokens,
            image_token_id=self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        torch.manual_seed(spec.seed)
        self.model = Blip2AnyPrompt(config)
        self.image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
        self._bos_pending = False
        self.model.eval()


def save_backbone(vlm: VLM, out: str | Path) -> Path:
    """Write model, tokenizer and image processor so the family adapter's `pretrained=` path loads them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(out)
    vlm.tokenizer.save_pretrained(out)
    vlm.image_processor.save_pretrained(out)
    return out
