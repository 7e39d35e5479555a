"""The tiny backbone of every family, built from sizes alone (shared by several test files)."""

from __future__ import annotations

from collections.abc import Callable

from backbones import VLM, Blip2OptVLM, ImageTextToTextVLM, LlavaVLM, MiniGPT4VLM, Qwen2VLVLM, TinySpec

FAMILIES: dict[str, Callable[..., VLM]] = {
    "llava": lambda seed=0: LlavaVLM(tiny=TinySpec(seed=seed)),
    "blip2_opt": lambda seed=0: Blip2OptVLM(tiny=TinySpec(seed=seed)),
    "minigpt4": lambda seed=0: MiniGPT4VLM(tiny=TinySpec(seed=seed)),
    "qwen2_vl": lambda seed=0: Qwen2VLVLM(tiny=TinySpec(seed=seed)),
    "generic_llava_next": lambda seed=0: ImageTextToTextVLM(tiny=TinySpec(seed=seed), family="llava_next"),
}
