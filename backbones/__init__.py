"""Backbone adapters: one per model family, all behind the `VLM` interface."""

from backbones.base import VLM, TeacherForced
from backbones.llava import LlavaVLM
from backbones.tiny import TinySpec

__all__ = ["VLM", "TeacherForced", "LlavaVLM", "TinySpec"]
