"""Editing methods, one file each, all behind the `Editor` interface (pure torch, no Lightning)."""

from editors.base import EditHandle, Editor, ParameterSnapshot, WeightEditHandle
from editors.finetune import FineTune
from editors.ike import IKE, InContextHandle

__all__ = [
    "EditHandle",
    "Editor",
    "FineTune",
    "IKE",
    "InContextHandle",
    "ParameterSnapshot",
    "WeightEditHandle",
]
