"""MiniGPT-4: BLIP-2's vision tower and Q-Former feeding a Vicuna (Llama) LM, with its own prompt format.

Transformers has no MiniGPT-4 class; a MiniGPT-4 checkpoint converted to Blip2ForConditionalGeneration
(Llama text config, `<image>` in the tokenizer, `image_token_id` in the config) is the same
architecture, so this adapter only changes the family's defaults.
"""

from __future__ import annotations

import os

from backbones.blip2 import Blip2FamilyVLM
from backbones.tiny import tiny_llama_config


class MiniGPT4VLM(Blip2FamilyVLM):
    """MiniGPT-4 adapter; `pretrained` must be a local directory holding a converted checkpoint."""

    default_prompt_format = "###Human: {content} ###Assistant:"
    default_image_text = "<Img><image></Img> "
    default_answer_prefix = " "
    tiny_text_config = staticmethod(tiny_llama_config)

    def check_pretrained(self, pretrained: str) -> None:
        # There is no official hub checkpoint in this format, so a hub name can only be a mistake.
        if not os.path.isdir(pretrained):
            raise ValueError(
                f"MiniGPT4VLM: 'pretrained' must be a local directory holding a MiniGPT-4 checkpoint converted "
                f"to Blip2ForConditionalGeneration (Llama text config), got {pretrained!r}; set "
                "--model.backbone.init_args.pretrained (or the path in configs/backbones/minigpt4_vicuna_7b.yaml)"
            )
