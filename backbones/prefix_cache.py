"""Teacher-forced scoring that runs each shared prompt prefix once and the probes' suffixes on its KV cache.

Many probes of a chunk start with the same tokens: with an in-context editor every probe of a case
carries the same demonstrations and new fact (each with its own picture), and on LLaVA-style prompts
Rel, T-Gen and Port share the edit image (576 of ~620 tokens on LLaVA-1.5). `shared_teacher_forced`
tokenises the chunk once, finds the prefixes worth sharing, runs each distinct prefix once
(left-padded, filling a `DynamicCache`), selects the cache rows for the probes that use it and runs
only their suffixes on top. Probes that share nothing go through the plain forward, and a chunk
where sharing would save little (`MIN_SAVING`, `MIN_SAVED_WORK`) runs as one plain forward, the
passes it ran before.
Generation (`VLM.generate`) is not affected.

A prefix is shared only when its token ids *and* the pictures inside it are equal (every picture
becomes the same run of placeholder ids, so the ids alone cannot tell two pictures apart); pictures
are compared by a digest of their pixels, not by identity. Prefixes end where an image's placeholder
run ends or where the in-context items end, never inside a run, and leave at least one token before
the answer, so every answer logit comes from the suffix pass exactly as it would from the full row.

Memory: the plain forward already keeps a `DynamicCache` of every row (the models' configs turn
`use_cache` on), so the selected cache rows (prefix width plus suffix width per row) cost about
what the plain pass of the same probes would.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from backbones.batching import (
    IGNORE_INDEX,
    BatchingBackbone,
    ProbeBatch,
    TeacherForced,
    teacher_forced_outputs,
)
from core.case import Probe

# Batch keys that hold one row per probe; every other key of a batch holds one entry per image.
_TEXT_KEYS = ("input_ids", "attention_mask")
_MARK = "\u2063PREFIX\u2063"
#: A chunk is split only when sharing saves at least this share of its tokens: the split costs up
#: to two more forward passes (prefixes, then suffixes, beside the plain rows), which a few saved
#: tokens do not pay for.
MIN_SAVING = 0.1
#: ...and saves at least this much work, counted as saved tokens x hidden size^2 (a token's cost in
#: a layer grows with the square of the width): each extra forward call has a fixed cost (Python,
#: kernel launches) that a few saved tokens of a narrow model do not pay for, while on a wide one
#: every token counts. Measured on CPU: on the world's LLaVA backbone (width 128) one FT case's nine
#: probes (281 tokens) sharing their edit picture (95 tokens saved, 1.6e6) took 45 ms split and
#: 34 ms plain, an IKE chunk (8,609 tokens, 5,912 saved, 9.7e7) 248 ms split and 511 ms plain.
#: The bound lets a width-128 model share from ~600 saved tokens, width 512 from ~40, a 4096-wide
#: LLaVA-1.5 from one.
MIN_SAVED_WORK = 1e7

# Digests by object id; the weak reference proves the id still names the same image.
_DIGESTS: dict[int, tuple[weakref.ref[Image.Image], bytes]] = {}


def image_digest(image: Image.Image) -> bytes:
    """A digest of what the processor sees of `image` (mode, size, pixels, palette), cached per object.

    Two probes may hold equal pictures as different objects (a loader that opens a file per field)
    or different pictures of equal size; only the content decides. Images are not mutated during
    scoring, so the digest of an object is computed once.
    """
    cached = _DIGESTS.get(id(image))
    if cached is not None and cached[0]() is image:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    if palette is not None:
        h.update(bytes(palette))
    digest = h.digest()
    key = id(image)
    # The entry leaves with the image, so a later object that reuses the id never finds it.
    _DIGESTS[key] = (weakref.ref(image, lambda _ref, key=key: _DIGESTS.pop(key, None)), digest)
    return digest


@dataclass
class _Row:
    """One probe's tokens in the chunk's batch and where its prefixes may end."""

    ids: list[int]
    answer_start: int
    images: list[int]  # indices of the probe's images in the batch's image tensors, in order
    run_ends: list[int]  # token index right after each image's placeholder run
    cuts: list[tuple[int, Hashable]] = field(default_factory=list)  # (end, key of the segment before it)


@dataclass
class _Node:
    """A prefix in the trie of the chunk's candidate prefixes (the root is the empty prefix)."""

    length: int
    children: dict[Hashable, _Node] = field(default_factory=dict)
    leaves: list[int] = field(default_factory=list)  # probes whose longest candidate prefix is this one
    size: int = 0  # probes under this node


def _runs(ids: Sequence[int], token_id: int) -> list[int]:
    """End index of every run of `token_id` in `ids`."""
    ends = [
        i + 1 for i, t in enumerate(ids) if t == token_id and (i + 1 == len(ids) or ids[i + 1] != token_id)
    ]
    return ends


def _context_end(
    vlm: BatchingBackbone,
    probe: Probe,
    row: _Row,
    image_token_id: int,
    memo: dict[Hashable, list[int] | None],
) -> int | None:
    """Token index where the probe's in-context items end, if the row has a token boundary there.

    The context is tokenised on its own as `build_batch` would tokenise it (same pieces, same image
    runs); the cut is only used when those ids are exactly the start of the row, so a tokenizer that
    merges across the boundary costs a candidate, never correctness.
    """
    n_images = sum(item.image is not None for item in probe.context)
    if not probe.context or n_images > len(row.run_ends):
        return None
    run_lengths = tuple(_run_length(row, j, image_token_id) for j in range(n_images))
    # The ids depend on the texts, where the pictures sit and their run lengths, not on the pictures.
    key = (tuple((item.text, item.image is not None) for item in probe.context), run_lengths)
    if key not in memo:
        memo[key] = _encode_context(vlm, probe, run_lengths, image_token_id)
    ids = memo[key]
    if ids is None or row.ids[: len(ids)] != ids:
        return None
    return len(ids)


def _run_length(row: _Row, j: int, image_token_id: int) -> int:
    end = row.run_ends[j]
    start = end
    while start > 0 and row.ids[start - 1] == image_token_id:
        start -= 1
    return end - start


def _encode_context(
    vlm: BatchingBackbone, probe: Probe, run_lengths: tuple[int, ...], image_token_id: int
) -> list[int] | None:
    text, _ = vlm.render_prompt(Probe(prompt="", answer="", context=probe.context))
    tail = vlm.prompt_format.format(content=_MARK).split(_MARK)[-1]
    if not text.endswith(tail):
        return None
    pieces = text[: len(text) - len(tail)].split(vlm.image_token)
    if len(pieces) - 1 != len(run_lengths):
        return None
    ids: list[int] = []
    for j, piece in enumerate(pieces):
        if j > 0:
            ids.extend([image_token_id] * run_lengths[j - 1])
        ids.extend(vlm._encode_text(piece, first=j == 0))
    return ids


def _rows(
    vlm: BatchingBackbone, probes: Sequence[Probe], counts: list[int], batch: ProbeBatch, digests: list[bytes]
) -> list[_Row]:
    """The probes' rows with their candidate prefix ends, each keyed by the tokens and pictures before it.

    `counts[i]` is how many images probe i holds; `digests` are those of every image of the batch.
    """
    image_token_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
    input_ids = batch.inputs["input_ids"].cpu()
    memo: dict[Hashable, list[int] | None] = {}
    rows: list[_Row] = []
    first_image = 0
    for i, (probe, n_images) in enumerate(zip(probes, counts, strict=True)):
        ids = input_ids[i, : batch.lengths[i]].tolist()
        images = list(range(first_image, first_image + n_images))
        first_image += n_images
        row = _Row(ids, batch.answer_spans[i][0], images, _runs(ids, image_token_id))
        rows.append(row)
        if len(row.run_ends) != n_images:
            continue  # adjacent images merged into one run: no safe place to cut
        ends = set(row.run_ends)
        context_end = _context_end(vlm, probe, row, image_token_id, memo)
        if context_end is not None:
            ends.add(context_end)
        previous = 0
        for end in sorted(e for e in ends if 0 < e < row.answer_start):
            pictures = tuple(
                digests[row.images[j]] for j, e in enumerate(row.run_ends) if previous < e <= end
            )
            row.cuts.append((end, (tuple(ids[previous:end]), pictures)))
            previous = end
    return rows


def plan_prefixes(rows: Sequence[_Row]) -> list[_Node | None]:
    """The prefix each probe is scored on top of (None: no shared prefix, the plain forward).

    The candidate prefixes form a trie; a prefix is run once for all probes under it that use it.
    The choice minimises the tokens run (each chosen prefix once, plus every probe's remainder), so
    a long prefix shared by two probes does not split off a shorter one shared by the whole case. It
    depends only on the probes' tokens and pictures, never on anything outside the chunk; ties go to
    fewer prefixes.
    """
    root = _Node(0)
    for i, row in enumerate(rows):
        node = root
        node.size += 1
        for end, key in row.cuts:
            node = node.children.setdefault(key, _Node(end))
            node.size += 1
        node.leaves.append(i)
    lengths = [len(r.ids) for r in rows]
    memo: dict[tuple[int, int], tuple[int, bool]] = {}

    def cost(node: _Node, above: int) -> tuple[int, bool]:
        """(tokens to run every probe under `node`, whether to run `node` as a prefix) given the
        nearest prefix above it has length `above`."""
        key = (id(node), above)
        if key not in memo:
            plain = sum(cost(c, above)[0] for c in node.children.values())
            plain += sum(lengths[i] - above for i in node.leaves)
            best = (plain, False)
            if node is not root and node.size > 1:
                shared = node.length + sum(cost(c, node.length)[0] for c in node.children.values())
                shared += sum(lengths[i] - node.length for i in node.leaves)
                if shared < plain:
                    best = (shared, True)
            memo[key] = best
        return memo[key]

    chosen: list[_Node | None] = [None] * len(rows)

    def assign(node: _Node, above: _Node | None) -> None:
        if cost(node, above.length if above else 0)[1]:
            above = node
        for i in node.leaves:
            chosen[i] = above
        for child in node.children.values():
            assign(child, above)

    assign(root, None)
    return chosen


def _image_keys(batch: ProbeBatch, n_images: int) -> list[str] | None:
    """The batch's per-image keys, or None when some key is neither per-probe nor per-image."""
    keys = [k for k in batch.inputs if k not in _TEXT_KEYS]
    if any(batch.inputs[k].shape[0] != n_images for k in keys):
        return None
    return keys


def _select_images(batch: ProbeBatch, keys: list[str], images: list[int]) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    index = torch.tensor(images, device=batch.inputs["input_ids"].device)
    return {k: batch.inputs[k].index_select(0, index.to(batch.inputs[k].device)) for k in keys}


def _plain_rows(batch: ProbeBatch, keys: list[str], rows: list[_Row], which: list[int]) -> ProbeBatch:
    """The sub-batch of probes `which`, exactly as `build_batch` would make it for them alone."""
    width = max(batch.lengths[i] for i in which)
    index = torch.tensor(which, device=batch.labels.device)
    inputs = {k: batch.inputs[k].index_select(0, index)[:, :width] for k in _TEXT_KEYS}
    inputs.update(_select_images(batch, keys, [j for i in which for j in rows[i].images]))
    return ProbeBatch(
        inputs,
        batch.labels.index_select(0, index)[:, :width],
        [batch.answer_spans[i] for i in which],
        [batch.lengths[i] for i in which],
        batch.left_padded,
    )


def _padded(seqs: Sequence[Sequence[int]], pad: int, left: bool, device: torch.device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        at = width - len(s) if left else 0
        ids[i, at : at + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, at : at + len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class ChunkPlan:
    """A tokenised chunk and, per probe, the shared prefix it is scored on (None: the plain forward)."""

    batch: ProbeBatch
    image_keys: list[str]
    rows: list[_Row]
    prefixes: list[_Node | None]

    def shared(self) -> list[int]:
        return [i for i, node in enumerate(self.prefixes) if node is not None]

    def alone(self) -> list[int]:
        return [i for i, node in enumerate(self.prefixes) if node is None]


def plan_chunk(vlm: BatchingBackbone, probes: Sequence[Probe]) -> ChunkPlan:
    """Tokenise `probes` as one batch and choose the prefixes to share (none where not known to be exact)."""
    batch = vlm.build_batch(probes)
    per_probe = [vlm.render_prompt(p)[1] for p in probes]
    images = [img for imgs in per_probe for img in imgs]
    keys = _image_keys(batch, len(images))
    if keys is None or any(DynamicCache(config=vlm.model.config).is_sliding):
        # Per-token extras or sliding-window layers: a split row is not known to score the same.
        return ChunkPlan(batch, [], [], [None] * len(probes))
    digests = [image_digest(img) for img in images]
    rows = _rows(vlm, probes, [len(imgs) for imgs in per_probe], batch, digests)
    prefixes = plan_prefixes(rows)
    plain = sum(len(r.ids) for r in rows)
    once = {id(node): node.length for node in prefixes if node is not None}
    saved = sum(node.length for node in prefixes if node is not None) - sum(once.values())
    width = int(getattr(vlm.text_config(), "hidden_size", 0) or 0)
    if saved < MIN_SAVING * plain or saved * width**2 < MIN_SAVED_WORK:
        prefixes = [None] * len(probes)
    return ChunkPlan(batch, keys, rows, prefixes)


@dataclass
class _SplitLogits:
    """Logits of the shared probes of a plan: each distinct prefix once, each probe's suffix."""

    which: list[int]  # the probes, by index in the chunk
    owner: list[int]  # row of each probe's prefix in `prefix_logits`
    cuts: list[int]  # each probe's prefix length
    prefix_logits: torch.Tensor | None  # (prefixes, width, V), left-padded; None unless asked for
    suffix_logits: torch.Tensor  # (probes, width, V), right-padded


def _forward_split(vlm: BatchingBackbone, plan: ChunkPlan, prefix_logits: bool) -> _SplitLogits:
    batch, rows = plan.batch, plan.rows
    which = plan.shared()
    device = batch.labels.device
    pad = vlm.tokenizer.pad_token_id
    # Distinct prefixes in chunk order, each run from the row of the first probe that uses it.
    slots: dict[int, int] = {}
    owner: list[int] = []
    reps: list[int] = []
    for i in which:
        node = plan.prefixes[i]
        if id(node) not in slots:
            slots[id(node)] = len(reps)
            reps.append(i)
        owner.append(slots[id(node)])
    cut = {i: plan.prefixes[i].length for i in which}  # type: ignore[union-attr]

    # 1. Each distinct prefix once, left-padded so that every prefix ends at the same column and
    #    positions count real tokens only (as in the full row).
    prefix_ids, prefix_mask = _padded([rows[r].ids[: cut[r]] for r in reps], pad, True, device)
    cache = DynamicCache(config=vlm.model.config)
    out = vlm.model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
        cache=cache,
        use_cache=True,
        # Every answer logit comes from the suffix pass; the prefix's only serve all-position top-k.
        logits_to_keep=0 if prefix_logits else 1,
        **_select_images(batch, plan.image_keys, _images(rows, reps, cut, before=True)),
    )
    kept = out.logits if prefix_logits else None
    del out

    # 2. The suffixes, right-padded, behind their prefixes' cache rows: the mask is the prefix's
    #    padding mask followed by the suffix's, positions continue from the prefix's real length.
    owners = torch.tensor(owner, device=device)
    cache.batch_select_indices(owners)
    suffix_ids, suffix_mask = _padded([rows[i].ids[cut[i] :] for i in which], pad, False, device)
    start = prefix_mask.sum(-1).index_select(0, owners)
    logits = vlm.model(
        input_ids=suffix_ids,
        attention_mask=torch.cat([prefix_mask.index_select(0, owners), suffix_mask], dim=1),
        position_ids=start[:, None] + torch.arange(suffix_ids.shape[1], device=device),
        cache=cache,
        use_cache=True,
        **_select_images(batch, plan.image_keys, _images(rows, which, cut, before=False)),
    ).logits
    return _SplitLogits(which, owner, [cut[i] for i in which], kept, logits)


def _images(rows: list[_Row], which: list[int], cut: dict[int, int], before: bool) -> list[int]:
    """The images of rows `which` that lie before (or after) each row's cut, in order."""
    return [
        j
        for i in which
        for j, end in zip(rows[i].images, rows[i].run_ends, strict=True)
        if (end <= cut[i]) == before
    ]


def shared_teacher_forced(
    vlm: BatchingBackbone, probes: Sequence[Probe], all_topk: int = 0
) -> list[TeacherForced]:
    """`teacher_forced_outputs` of one chunk of probes, shared prefixes run once.

    The outputs equal those of the plain forward over the chunk up to floating-point rounding: each
    suffix sees the same tokens at the same positions behind the same (unpadded) keys.
    """
    plan = plan_chunk(vlm, probes)
    batch = plan.batch
    alone = plan.alone()
    if len(alone) == len(probes):
        return _plain(vlm, batch, all_topk)
    results: list[TeacherForced | None] = [None] * len(probes)
    if alone:
        sub = _plain_rows(batch, plan.image_keys, plan.rows, alone)
        for i, out in zip(alone, _plain(vlm, sub, all_topk), strict=True):
            results[i] = out
    split = _forward_split(vlm, plan, prefix_logits=all_topk > 0)
    lengths = [batch.lengths[i] - c for i, c in zip(split.which, split.cuts, strict=True)]
    labels = torch.full(
        split.suffix_logits.shape[:2], IGNORE_INDEX, dtype=torch.long, device=batch.labels.device
    )
    spans = []
    for k, (i, c) in enumerate(zip(split.which, split.cuts, strict=True)):
        labels[k, : lengths[k]] = batch.labels[i, c : batch.lengths[i]]
        spans.append((batch.answer_spans[i][0] - c, batch.answer_spans[i][1] - c))
    outs = teacher_forced_outputs(split.suffix_logits, labels, spans, lengths, all_topk)
    if split.prefix_logits is not None:
        # All-position top-k: the prefix's positions come from its own pass, in the same dtype.
        head = split.prefix_logits.topk(all_topk, dim=-1).indices.cpu()
        width = head.shape[1]
        ids = batch.inputs["input_ids"].cpu()
        for out, o, c, i in zip(outs, split.owner, split.cuts, split.which, strict=True):
            out.all_topk = torch.cat([head[o, width - c :], out.all_topk])
            out.ids = ids[i, : batch.lengths[i]]
    for i, out in zip(split.which, outs, strict=True):
        results[i] = out
    return results  # type: ignore[return-value]


def row_logits(vlm: BatchingBackbone, probes: Sequence[Probe]) -> list[torch.Tensor]:
    """Each probe's (length, V) logits over its row as `shared_teacher_forced` computes them.

    For checking that sharing changes nothing beyond rounding; scoring never materialises these.
    """
    with torch.inference_mode():
        plan = plan_chunk(vlm, probes)
        batch = plan.batch
        rows: list[torch.Tensor | None] = [None] * len(probes)
        alone = plan.alone()
        if alone:
            sub = (
                batch if len(alone) == len(probes) else _plain_rows(batch, plan.image_keys, plan.rows, alone)
            )
            logits = vlm.logits(sub)
            for k, i in enumerate(alone):
                rows[i] = logits[k, : batch.lengths[i]]
        if plan.shared():
            split = _forward_split(vlm, plan, prefix_logits=True)
            width = split.prefix_logits.shape[1]  # type: ignore[union-attr]
            for k, (i, o, c) in enumerate(zip(split.which, split.owner, split.cuts, strict=True)):
                head = split.prefix_logits[o, width - c :]  # type: ignore[index]
                rows[i] = torch.cat([head, split.suffix_logits[k, : batch.lengths[i] - c]])
        return rows  # type: ignore[return-value]


def _plain(vlm: BatchingBackbone, batch: ProbeBatch, all_topk: int) -> list[TeacherForced]:
    return teacher_forced_outputs(
        vlm.logits(batch),
        batch.labels,
        batch.answer_spans,
        batch.lengths,
        all_topk,
        batch.inputs["input_ids"],
    )
