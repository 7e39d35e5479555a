"""The world's word-level tokenizer: every word of the world is one token.

Built with the `tokenizers` library from the world's own texts (every template, value, caption and
the prompt layouts of the VLM adapters and IKE) and saved with `save_pretrained`, so a world backbone
loads through `AutoTokenizer.from_pretrained` like any real checkpoint. Word-level rather than byte
level: answers are one token, sequences are 5-10x shorter, and training on 2 CPU cores fits minutes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from backbones.tiny import BASE_SPECIAL_TOKENS
from world.generate import World
from world.probes import train_image_qas, train_text_qas, withheld_qas
from world.relations import (
    CAPTION_TEMPLATES,
    COMPOSITE_TEMPLATES,
    FRAME_TEXT,
    IMAGE_TEMPLATES,
    TEXT_TEMPLATES,
)

IMAGE_TOKEN = "<image>"


def world_texts(world: World) -> list[str]:
    """Every text the world can put in a prompt or an answer."""
    texts = list(FRAME_TEXT)
    texts += [t for train, held in IMAGE_TEMPLATES.values() for t in (*train, *held)]
    texts += [t for _, train, held in TEXT_TEMPLATES.values() for t in (*train, *held)]
    texts += list(COMPOSITE_TEMPLATES.values()) + [t for group in CAPTION_TEMPLATES for t in group]
    texts += [v for values in world.values.values() for v in values]
    for entity in world.entities:
        texts += [a for _, a in train_image_qas(world, entity)] + [a for _, a, _ in withheld_qas(entity)]
        texts.append(world.caption(entity))
    texts += [a for _, a in train_text_qas(world)]
    return texts


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `world_texts(world)`; BOS is prepended as in Llama/OPT."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in world_texts(world) for w, _ in pre.pre_tokenize_str(text)})
    specials = [*BASE_SPECIAL_TOKENS, IMAGE_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Strip()
    core.pre_tokenizer = pre
    # WordPiece's decoder joins words with spaces and glues punctuation back ("Veld ." -> "Veld.").
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
