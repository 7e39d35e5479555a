"""Tiny, download-free tokenizers and configs for building any backbone family from a config.

Tests and CI never fetch weights: they build the real transformers classes at toy sizes. The
tokenizer is byte-level with no merges, so it encodes any UTF-8 text without a trained vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

BASE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class TinySpec:
    """Sizes of a tiny backbone built from scratch (tests, CI, the demo before the world backbone).

    Args:
        hidden_size: width of the language model (and of the vision tower unless `vision_hidden_size`).
        num_layers: language decoder layers.
        vision_hidden_size: width of the vision tower.
        vision_layers: vision encoder layers.
        image_size: input resolution of the vision tower.
        patch_size: vision patch size.
        num_heads: attention heads in both towers.
        num_query_tokens: Q-Former queries (BLIP-2 families only).
        seed: initialisation seed, so two builds are identical.
        intermediate_size: width of the language model's feed-forward layers; None: twice
            `hidden_size`. (Benchmarks shape a real model with it: LLaVA-1.5-7B has 11008.)
        max_positions: the language model's position limit (`max_position_embeddings`;
            LLaVA-1.5 has 4096).
    """

    hidden_size: int = 32
    num_layers: int = 2
    vision_hidden_size: int = 32
    vision_layers: int = 1
    image_size: int = 32
    patch_size: int = 8
    num_heads: int = 2
    num_query_tokens: int = 4
    seed: int = 0
    intermediate_size: int | None = None
    max_positions: int = 1024

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"tiny.image_size ({self.image_size}) must be a multiple of tiny.patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads or self.vision_hidden_size % self.num_heads:
            raise ValueError(
                "tiny.hidden_size and tiny.vision_hidden_size must be multiples of tiny.num_heads"
            )

    @property
    def ffn_size(self) -> int:
        """The language model's feed-forward width."""
        return self.intermediate_size or self.hidden_size * 2


def byte_tokenizer(
    extra_special_tokens: tuple[str, ...] = ("<image>",), chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) plus special tokens; BOS is prepended."""
    specials = list(BASE_SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in BASE_SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[len(BASE_SPECIAL_TOKENS) :],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_clip_vision_config(spec: TinySpec) -> CLIPVisionConfig:
    """The CLIP vision tower of the tiny LLaVA-style families."""
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def tiny_llama_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama language model of the tiny LLaVA, LLaVA-NeXT and MiniGPT-4 families."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
