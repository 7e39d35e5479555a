"""Backbone adapters: one per model family, all behind the `VLM` interface."""

from backbones.base import VLM
from backbones.batching import TeacherForced
from backbones.blip2 import Blip2FamilyVLM, Blip2OptVLM
from backbones.generic import ImageTextToTextVLM
from backbones.llava import LlavaVLM
from backbones.minigpt4 import MiniGPT4VLM
from backbones.qwen2_vl import Qwen2VLVLM
from backbones.tiny import TinySpec

__all__ = [
    "VLM",
    "TeacherForced",
    "Blip2FamilyVLM",
    "Blip2OptVLM",
    "ImageTextToTextVLM",
    "LlavaVLM",
    "MiniGPT4VLM",
    "Qwen2VLVLM",
    "TinySpec",
]
