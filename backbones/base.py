"""The `VLM` interface: one Hugging Face vision-language model and its processor behind one API.

Methods and the evaluation loop only talk to this class. It turns probes into padded batches with
answer-token labels, returns teacher-forced predictions or generated text, names parameter groups
and exposes hidden-state hooks. Family adapters (LLaVA, BLIP-2, Qwen2-VL, ...) only say how images
become pixel tensors and image tokens, where their modules live, and how their prompts look; no
method ever branches on a model's name.

Prompts are built by hand rather than through each processor's text expansion so that every family
supports images anywhere in the prompt (in-context demonstrations with their own pictures) and so
that answer positions are known exactly.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from backbones.batching import (
    IGNORE_INDEX,
    ProbeBatch,
    TeacherForced,
    answer_nll,
    row_tokens,
    teacher_forced_outputs,
)
from backbones.greedy_from_tf import eos_token_ids, greedy_altering_settings, greedy_tokens
from backbones.layer_parts import AttentionParts, FfnPorts, attention_parts, ffn_ports
from backbones.prefix_cache import shared_teacher_forced
from backbones.token_groups import TokenGroups, token_groups
from backbones.training_loss import TrainingLoss
from core.case import Probe

T = TypeVar("T")

#: Where a locate-then-edit method reads a fact's key in a probe's row (`VLM.key_positions`).
KEY_POSITIONS: tuple[str, ...] = ("image", "question", "prompt_end", "span")


class PromptTooLongError(ValueError):
    """A probe's token row is longer than the language model's position limit.

    Past the limit, models with learned positions fail with an index error deep in the forward pass
    and rotary models silently score garbage, so the row is refused before any forward. The probe is
    kept so that the evaluation loop can name the case and record it came from.
    """

    def __init__(self, probe: Probe, length: int, limit: int, chars_per_token: int | None = None) -> None:
        self.probe = probe
        self.length = length
        self.limit = limit
        if chars_per_token is None:
            size = f"{length} tokens long (prompt, image tokens, context and answer)"
        else:
            # Refused from its character count, before tokenising (a 50 MB prompt would take minutes).
            size = (
                f"{length} characters long; no token of this tokenizer covers more than {chars_per_token} "
                f"characters, so it is at least {-(-length // chars_per_token)} tokens"
            )
        super().__init__(
            f"{probe.kind} probe {probe.prompt[:60]!r}{'...' if len(probe.prompt) > 60 else ''} is "
            f"{size}, more than the model's {limit} positions (max_position_embeddings)"
        )


class VLM(nn.Module, abc.ABC):
    """Base adapter. Subclasses set `model`, `tokenizer` and implement the abstract hooks below.

    Args:
        prompt_format: how a probe is laid out for this family; `{content}` is replaced by the
            (context and) question, with each image written as `image_text` at its place.
        image_text: how one image appears inside the prompt text; it must contain `image_token`.
        answer_prefix: prepended to answers before tokenising (the benchmarks use a leading space).
        max_batch_size: probes per forward pass; larger lists are scored in chunks.
        max_new_tokens: extra tokens allowed beyond each answer's own length when generating (0: the greedy continuation is exactly as long as the answer, so exact match asks whether the model says the answer, not whether it stops).
        share_prefixes: in teacher-forced scoring, run a prompt prefix that several probes of a chunk
            share (same tokens and same pictures: an in-context editor's demonstrations, a shared
            edit image) once and the probes' remainders on its KV cache; only where the backbone
            `supports_prefix_cache`. False: every probe row runs whole.
        reuse_teacher_forced: when probes just scored teacher-forced are also generated, read each
            greedy answer off that pass wherever it decides it (`backbones/greedy_from_tf.py`:
            every pick up to the first that leaves the gold answer) and decode only the other rows.
            False: decode every row.
    """

    image_token: str = "<image>"
    #: Whether teacher-forced scoring may split rows into a cached prefix and a suffix pass
    #: (`backbones.prefix_cache`). True only in adapters whose models were checked to give the same
    #: logits that way: the forward takes `cache`, `position_ids` and `logits_to_keep`, positions are
    #: plain token counts, and every image input holds one entry per image.
    supports_prefix_cache: bool = False

    def __init__(
        self,
        prompt_format: str,
        image_text: str,
        answer_prefix: str = " ",
        max_batch_size: int = 64,
        max_new_tokens: int = 0,
        share_prefixes: bool = True,
        reuse_teacher_forced: bool = True,
    ) -> None:
        super().__init__()
        if "{content}" not in prompt_format:
            raise ValueError(f"prompt_format must contain '{{content}}', got {prompt_format!r}")
        if self.image_token not in image_text:
            raise ValueError(
                f"image_text must contain the image token {self.image_token!r}, got {image_text!r}"
            )
        self.prompt_format = prompt_format
        self.image_text = image_text
        self.answer_prefix = answer_prefix
        self.max_batch_size = max_batch_size
        self.max_new_tokens = max_new_tokens
        self.share_prefixes = share_prefixes
        self.reuse_teacher_forced = reuse_teacher_forced
        #: Greedy answers so far: read off a teacher-forced pass, or decoded (results record them).
        self.generation_counts = {"read_off_teacher_forced": 0, "decoded": 0}

    # ----------------------------------------------------------------- family hooks
    model: nn.Module
    tokenizer: object

    @abc.abstractmethod
    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Pixel tensors (and any grid info) for `images`, in order, as the model's forward expects."""

    @abc.abstractmethod
    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        """How many image tokens each image of `image_inputs` takes in the sequence."""

    def image_features(self, image_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the vectors the language model reads in its place ([tokens, hidden]).

        The vision tower and projector (Q-Former, queries and projection on BLIP-2) applied to
        `image_inputs`, through the model's own `get_image_features`.
        """
        features = self.model.get_image_features(**image_inputs).pooler_output
        return list(features) if isinstance(features, torch.Tensor) else list(features)

    @abc.abstractmethod
    def vision_modules(self) -> list[nn.Module | nn.Parameter]:
        """The vision encoder's modules (what FT (Vis) may train when it reaches past the projector)."""

    @abc.abstractmethod
    def projector_modules(self) -> list[nn.Module | nn.Parameter]:
        """What maps vision features into the language model: projector, or Q-Former and its queries."""

    @abc.abstractmethod
    def language_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, in order."""

    def ffn(self, layer: int) -> nn.Module:
        """The feed-forward block of language layer `layer` (negative indices count from the end)."""
        return self.language_layers()[layer].mlp

    def ffn_members(self, layer: int) -> list[nn.Module | nn.Parameter]:
        """What the parameter group `ffn:<layer>` holds; override where the FFN is not one submodule (OPT)."""
        return [self.ffn(layer)]

    def attention_parts(self, layer: int) -> AttentionParts:
        """Language layer `layer`'s self-attention module and projections (`backbones/layer_parts.py`)."""
        return attention_parts(self.language_layers()[layer])

    def ffn_ports(self, layer: int) -> FfnPorts:
        """Where language layer `layer`'s FFN takes its input q and gives its output (added neurons hook here)."""
        return ffn_ports(self.language_layers()[layer])

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def final_modules(self) -> list[nn.Module] | None:
        """What maps the last language layer's output to logits, in call order (final norm, lm_head).

        None (the default) where the adapter does not know; then editors that train only upper
        layers cannot replay them from cached inputs (`backbones/frozen_prefix.py`) and run the
        whole model instead.
        """
        return None

    def describe(self) -> dict[str, object]:
        """What a results file records about this backbone."""
        return {
            "class": type(self).__name__,
            "model_class": type(self.model).__name__,
            "prompt_format": self.prompt_format,
            "image_text": self.image_text,
            "answer_prefix": self.answer_prefix,
            "shares_prefixes": self.share_prefixes and self.supports_prefix_cache,
            "reuses_teacher_forced": self.reuse_teacher_forced,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def text_config(self) -> object:
        """The language model's config (the whole config for models that have no nested one)."""
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def max_positions(self) -> int | None:
        """The language model's position limit (`max_position_embeddings`), None where it names none."""
        limit = getattr(self.text_config(), "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) and limit > 0 else None

    def fingerprint(self, *groups: str) -> dict[str, object]:
        """What a trained editor depends on: the model's class and sizes, and the parameters it attaches to.

        Trainable editors store this next to their weights and compare it when loading, so a
        checkpoint trained on another backbone fails with both descriptions instead of a shape error
        (or worse, no error) halfway through an evaluation. `groups` are parameter groups as in
        `parameter_group` (`"ffn:-1"`, `"projector"`); their names and shapes are included.
        """
        text = self.text_config()
        embeddings = self.model.get_input_embeddings()
        return {
            "model_class": type(self.model).__name__,
            "hidden_size": int(getattr(text, "hidden_size", 0) or 0),
            "num_layers": self.num_language_layers,
            "vocab_size": int(embeddings.weight.shape[0]),
            "parameters": {name: list(p.shape) for name, p in self.parameter_group(*groups).items()},
        }

    @torch.no_grad()
    def weights_digest(self, samples: int = 4096) -> str:
        """A cheap fingerprint of the weights' values: SHA-256 over a strided sample of every tensor.

        Results folders record it, so a rerun with other weights (another checkpoint, another seed)
        is not taken for the same run. Sampling keeps it to milliseconds on a 7B model.
        """
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            flat = tensor.detach().flatten()
            step = max(1, flat.numel() // samples)
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
        return digest.hexdigest()

    # ----------------------------------------------------------------- parameter groups
    @property
    def num_language_layers(self) -> int:
        return len(self.language_layers())

    def _group_members(self, group: str) -> list[nn.Module | nn.Parameter]:
        if group == "vision":
            return self.vision_modules()
        if group == "projector":
            return self.projector_modules()
        if group == "language":
            return list(self.language_layers())
        if group == "lm_head":
            return [self.lm_head()]
        kind, _, index = group.partition(":")
        if kind in ("layer", "ffn") and index.lstrip("-").isdigit():
            i = int(index)
            n = self.num_language_layers
            if not -n <= i < n:
                raise ValueError(f"parameter group {group!r}: the language model has {n} layers")
            return [self.language_layers()[i]] if kind == "layer" else self.ffn_members(i)
        raise ValueError(
            f"unknown parameter group {group!r}; expected vision, projector, language, lm_head, layer:<i> or ffn:<i>"
        )

    def parameter_group(self, *groups: str) -> dict[str, nn.Parameter]:
        """Named parameters (names as in `self.model.state_dict()`) of the given groups."""
        wanted: set[int] = set()
        for group in groups:
            for member in self._group_members(group):
                if isinstance(member, nn.Parameter):
                    wanted.add(id(member))
                else:
                    wanted.update(id(p) for p in member.parameters())
        return {n: p for n, p in self.model.named_parameters() if id(p) in wanted}

    # ----------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def capture_hidden(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Capture the output hidden states of the given language layers during forwards in the block."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for i in layers:

            def hook(_m, _inp, out, i=i):
                captured[i] = out[0] if isinstance(out, tuple) else out

            handles.append(self.language_layers()[i].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    # ----------------------------------------------------------------- batching
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render_prompt(self, probe: Probe) -> tuple[str, list[Image.Image]]:
        """The probe's full prompt text and its images in order of appearance."""
        parts: list[str] = []
        images: list[Image.Image] = []
        for item in probe.context:
            if item.image is not None:
                parts.append(self.image_text)
                images.append(item.image)
            parts.append(item.text + "\n")
        if probe.image is not None:
            parts.append(self.image_text)
            images.append(probe.image)
        parts.append(probe.prompt)
        return self.prompt_format.format(content="".join(parts)), images

    def max_token_chars(self) -> int:
        """The most characters one token can stand for: the longest vocabulary entry (at least 32).

        A byte-level or SentencePiece token's vocabulary string is at least as long as the text it
        decodes to; the floor of 32 covers word-level tokenizers, whose unknown-word token stands
        for a whole word.
        """
        cached = getattr(self, "_max_token_chars", None)
        if cached is None:
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            cached = max([32, *(len(token) for token in vocab)])
            self._max_token_chars = cached
        return cached

    def _refuse_long_text(self, probes: Sequence[Probe], rendered: Sequence[tuple[str, list]]) -> None:
        """Refuse, before tokenising, a probe whose text alone must exceed the position limit."""
        limit = self.max_positions()
        if limit is None:
            return
        per_token = self.max_token_chars()
        for probe, (text, _) in zip(probes, rendered, strict=True):
            chars = len(text) + len(self.answer_prefix) + len(probe.answer)
            if chars > limit * per_token:
                raise PromptTooLongError(probe, chars, limit, chars_per_token=per_token)

    def _encode_text(self, text: str, first: bool) -> list[int]:
        # Only the first piece gets the tokenizer's special prefix (BOS); pieces around images never do.
        return self.tokenizer(text, add_special_tokens=first).input_ids if text or first else []

    def encode_answer(self, answer: str) -> list[int]:
        return self.tokenizer(self.answer_prefix + answer, add_special_tokens=False).input_ids

    def build_batch(self, probes: Sequence[Probe], with_answers: bool = True) -> ProbeBatch:
        """Tokenise probes into one padded batch; right-padded for scoring, left-padded for generation."""
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        rendered = [self.render_prompt(p) for p in probes]
        self._refuse_long_text(probes, rendered)
        all_images = [img for _, imgs in rendered for img in imgs]
        image_inputs = self.image_inputs(all_images) if all_images else {}
        counts = iter(self.image_token_counts(image_inputs) if all_images else [])
        rows: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        for probe, (text, images) in zip(probes, rendered, strict=True):
            pieces = text.split(self.image_token)
            if len(pieces) - 1 != len(images):
                raise ValueError(
                    f"prompt {probe.prompt!r} holds {len(pieces) - 1} image tokens but the probe has {len(images)} images"
                )
            ids: list[int] = []
            for j, piece in enumerate(pieces):
                if j > 0:
                    ids.extend([image_token_id] * next(counts))
                ids.extend(self._encode_text(piece, first=j == 0))
            start = len(ids)
            if with_answers:
                ids.extend(self.encode_answer(probe.answer))
            spans.append((start, len(ids)))
            rows.append(ids)
        limit = self.max_positions()
        if limit is not None:
            for probe, ids in zip(probes, rows, strict=True):
                if len(ids) > limit:
                    raise PromptTooLongError(probe, len(ids), limit)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError(f"{type(self).__name__}: the tokenizer has no pad token")
        width = max(len(r) for r in rows)
        left = not with_answers
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, (s, e)) in enumerate(zip(rows, spans, strict=True)):
            offset = width - len(ids) if left else 0
            input_ids[i, offset : offset + len(ids)] = torch.tensor(ids)
            attention[i, offset : offset + len(ids)] = 1
            labels[i, offset + s : offset + e] = input_ids[i, offset + s : offset + e]
            spans[i] = (offset + s, offset + e)
        device = self.device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        dtype = next(self.model.parameters()).dtype
        for k, v in image_inputs.items():
            inputs[k] = v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
        return ProbeBatch(inputs, labels.to(device), spans, [len(r) for r in rows], left)

    def key_positions(
        self, probes: Sequence[Probe], batch: ProbeBatch, where: str, span: str | None = None
    ) -> list[int]:
        """One position per row of `batch` (built from `probes`): where a fact's key is read.

        `where`: "image", the last image token (the pictured subject, as ROME's last subject token);
        "question", the last token of the probe's own question text (before the family's template
        closes the turn); "prompt_end", the last prompt position (it predicts the first answer
        token); "span", the last token of the first occurrence of `span` in the question text.
        """
        if where not in KEY_POSITIONS:
            raise ValueError(f"key position must be one of {KEY_POSITIONS}, got {where!r}")
        if where in ("image", "prompt_end"):
            groups = self.token_groups(batch)
            if where == "prompt_end":
                return [g.last for g in groups]
            missing = [row for row, g in enumerate(groups) if not g.image]
            if missing:
                raise ValueError(f"row {missing[0]} holds no image token: it has no last image position")
            return [g.image[-1] for g in groups]
        positions = []
        for row, probe in enumerate(probes):
            if where == "question":
                end = len(probe.prompt)
            else:
                if not span:
                    raise ValueError('key position "span" needs the span text (span is empty)')
                start = probe.prompt.find(span)
                if start < 0:
                    raise ValueError(f"span {span!r} does not occur in the question {probe.prompt!r}")
                end = start + len(span)
            offset, ids = row_tokens(batch, row)
            positions.append(offset + self.text_end_position(probe, ids, end))
        return positions

    def text_end_position(self, probe: Probe, row_ids: Sequence[int], end: int) -> int:
        """Index in a probe's row (ids without padding) of the token that ends at character `end` of its question.

        The row's text is re-encoded up to that character, piece by piece as `build_batch` encodes it
        (image runs copied from the row), and must be a prefix of the row: a span that ends inside
        a token (a word-piece merge across its end) is refused rather than placed approximately.
        """
        if not 0 < end <= len(probe.prompt):
            raise ValueError(f"character {end} is not inside the question {probe.prompt!r}")
        text, _ = self.render_prompt(replace(probe, prompt=probe.prompt[:end]))
        closing = self.prompt_format.split("{content}", 1)[1]
        text = text[: len(text) - len(closing)] if closing else text
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        runs: list[int] = []
        for i, token in enumerate(row_ids):
            if token == image_id:
                if i and row_ids[i - 1] == image_id:
                    runs[-1] += 1
                else:
                    runs.append(1)
        ids: list[int] = []
        for j, piece in enumerate(text.split(self.image_token)):
            if j > 0:
                ids.extend([image_id] * runs[j - 1])
            ids.extend(self._encode_text(piece, first=j == 0))
        if not ids or list(row_ids[: len(ids)]) != ids:
            raise ValueError(
                f"the question {probe.prompt!r} cut after character {end} ({probe.prompt[:end]!r}) does not "
                "end at a token boundary of its row"
            )
        return len(ids) - 1

    # ----------------------------------------------------------------- forward passes
    def logits(self, batch: ProbeBatch, **forward_kwargs: object) -> torch.Tensor:
        return self.model(**batch.inputs, **forward_kwargs).logits

    def logits_with(
        self, batch: ProbeBatch, weights: dict[str, torch.Tensor], **forward_kwargs: object
    ) -> torch.Tensor:
        """`logits` with `weights` (parameter name -> tensor) in place of those parameters, nothing written.

        What editors that learn to edit need: the loss of an edited model as a differentiable
        function of the edited weights (`torch.func.functional_call`), the backbone left as it is.
        """
        return functional_call(self.model, weights, args=(), kwargs={**batch.inputs, **forward_kwargs}).logits

    def loss(self, probes: Sequence[Probe]) -> torch.Tensor:
        """Mean negative log-likelihood of the probes' answer tokens (what editors minimise)."""
        return self.batch_loss(self.build_batch(probes))

    def batch_loss(self, batch: ProbeBatch) -> torch.Tensor:
        """`loss` of an already built batch (editors that step many times on the same probes build it once)."""
        return answer_nll(self.logits(batch), batch.labels)

    def training_loss(self, trained: Iterable[nn.Parameter], reuse_frozen: bool = True) -> TrainingLoss:
        """Loss closures for optimising `trained` on fixed probes: `with vlm.training_loss(p).over(probes) as loss`.

        The backbone runs what stays frozen once per case where that is exact
        (`backbones/training_loss.py`); `reuse_frozen=False` runs the whole model at every call.
        """
        return TrainingLoss(self, trained, reuse_frozen)

    def _in_chunks(self, probes: Sequence[Probe], run: Callable[[Sequence[Probe]], list[T]]) -> list[T]:
        """`run` over chunks of at most `max_batch_size` probes of similar length, results in input order.

        Probes are grouped by image count and text length first, so a chunk pads little: batching
        many cases' probes together then costs close to their own tokens, not the longest one's.
        The order is a pure function of the probes, so the same probes always form the same chunks.
        """
        order = sorted(range(len(probes)), key=lambda i: _length_key(probes[i]))
        results: list[T | None] = [None] * len(probes)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            for i, result in zip(idx, run([probes[i] for i in idx]), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def teacher_forced(self, probes: Sequence[Probe], all_topk: int = 0) -> list[TeacherForced]:
        """Argmax predictions at answer positions (logit t predicts token t+1), batched in chunks.

        With `share_prefixes` (and a backbone that `supports_prefix_cache`) a chunk's shared prompt
        prefixes are run once; the outputs are the same up to floating-point rounding.
        """

        def run(chunk: Sequence[Probe]) -> list[TeacherForced]:
            if self.share_prefixes and self.supports_prefix_cache:
                return shared_teacher_forced(self, chunk, all_topk)
            batch = self.build_batch(chunk)
            return teacher_forced_outputs(
                self.logits(batch),
                batch.labels,
                batch.answer_spans,
                batch.lengths,
                all_topk,
                batch.inputs["input_ids"],
            )

        return self._in_chunks(probes, run)

    def generation_configs(self) -> list[object]:
        """The generation configs `generate` may consult: the model's and any nested model's (BLIP-2
        hands decoding to its language model, which reads its own)."""
        return [
            m.generation_config
            for m in self.model.modules()
            if getattr(m, "generation_config", None) is not None
        ]

    def _answers_from_teacher_forced(
        self, teacher_forced: Sequence[TeacherForced], budgets: Sequence[int]
    ) -> list[str | None]:
        """Each probe's greedy answer where its teacher-forced outputs decide it, else None."""
        configs = self.generation_configs()
        if not self.reuse_teacher_forced or any(greedy_altering_settings(c) for c in configs):
            return [None] * len(budgets)
        eos = eos_token_ids(configs)
        answers: list[str | None] = []
        for tf, budget in zip(teacher_forced, budgets, strict=True):
            picks = greedy_tokens(tf.pred, tf.labels, budget, eos)
            answers.append(None if picks is None else self._decode_generated(picks, budget))
        return answers

    def _budget(self, probe: Probe) -> int:
        """How many tokens a probe's greedy answer runs for: its answer's own length plus `max_new_tokens`."""
        return len(self.encode_answer(probe.answer)) + self.max_new_tokens

    def _decode_generated(self, tokens: Sequence[int] | torch.Tensor, budget: int) -> str:
        """A generated row as text, cut to its budget (the padding after an end-of-sequence pick is special, so skipped)."""
        return self.tokenizer.decode([int(t) for t in tokens][:budget], skip_special_tokens=True)

    @torch.inference_mode()
    def generate(
        self, probes: Sequence[Probe], teacher_forced: Sequence[TeacherForced] | None = None
    ) -> list[str]:
        """Greedy answers, each cut to its own answer's token count plus `max_new_tokens`.

        A chunk decodes together up to its longest budget; each row is then cut to its own budget,
        so a probe's generation does not depend on which other probes share its batch.
        `teacher_forced`: the same probes' outputs from `teacher_forced` on the model as it is now;
        with `reuse_teacher_forced`, rows they decide are not decoded.
        """
        budgets = [self._budget(p) for p in probes]
        if teacher_forced is None:
            answers: list[str | None] = [None] * len(probes)
        else:
            answers = self._answers_from_teacher_forced(teacher_forced, budgets)
        todo = [i for i, answer in enumerate(answers) if answer is None]
        self.generation_counts["read_off_teacher_forced"] += len(probes) - len(todo)
        self.generation_counts["decoded"] += len(todo)

        def run(chunk: Sequence[Probe]) -> list[str]:
            batch = self.build_batch(chunk, with_answers=False)
            chunk_budgets = [self._budget(p) for p in chunk]
            out = self.model.generate(
                **batch.inputs,
                max_new_tokens=max(chunk_budgets),
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[:, batch.inputs["input_ids"].shape[1] :]
            return [self._decode_generated(row, b) for row, b in zip(new, chunk_budgets, strict=True)]

        decoded = self._in_chunks([probes[i] for i in todo], run)
        for i, answer in zip(todo, decoded, strict=True):
            answers[i] = answer
        return answers  # type: ignore[return-value]

    def token_groups(self, batch: ProbeBatch) -> list[TokenGroups]:
        """Each row's image, prefix and question positions and last prompt token (`backbones/token_groups.py`)."""
        return token_groups(batch, self.tokenizer.convert_tokens_to_ids(self.image_token))

    @torch.inference_mode()
    def embed(self, probes: Sequence[Probe]) -> torch.Tensor:
        """One vector per probe: the last language layer's states, mean-pooled over the prompt."""

        def run(chunk: Sequence[Probe]) -> list[torch.Tensor]:
            batch = self.build_batch(chunk, with_answers=False)
            with self.capture_hidden([-1]) as hidden:
                self.model(**batch.inputs)
            mask = batch.inputs["attention_mask"].unsqueeze(-1).to(hidden[-1].dtype)
            return list(((hidden[-1] * mask).sum(1) / mask.sum(1)).float().cpu())

        return torch.stack(self._in_chunks(probes, run)) if probes else torch.zeros(0)


def _length_key(probe: Probe) -> tuple[int, int]:
    """A cheap stand-in for a probe's token length: its images, then its characters."""
    images = sum(item.image is not None for item in probe.context) + (probe.image is not None)
    chars = len(probe.prompt) + len(probe.answer) + sum(len(item.text) for item in probe.context)
    return images, chars
