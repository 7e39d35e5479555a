"""Second moments of FFN keys, C = E[k k^T], estimated once from a corpus and cached on disk.

Locate-then-edit methods (ROME, MEMIT, AlphaEdit) weigh an update by how the edited layer's keys
(the inputs of the FFN's value projection, `vlm.ffn_ports(l).value_linear`) are spread over text the
model has seen: ROME's update direction is C^{-1} k*, MEMIT's solve carries lambda C, AlphaEdit
projects onto C's near-null space. The references estimate C over 100K Wikipedia samples; here the
corpus is an annotation file's prompts with their images (every probe of every record, answer
included, every real position: image tokens too, since a key may sit on the last image token).

One file per (backbone, corpus, layer) under `folder`: `<digest>.safetensors` with the moment and
`<digest>.json` with what made it. The digest covers the backbone's fingerprint and weights digest
(`knowledge.store.backbone_key`), the corpus (the file's SHA-256 and how it is read, or a digest of
in-memory probes) and the layer, so other weights or another corpus never read a stale moment: they
compute (and cache) their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from backbones.base import VLM
from core.case import Probe
from knowledge.store import backbone_key, digest

#: Where moments are cached unless a config says otherwise (`/results/` is ignored by git).
DEFAULT_STATS_DIR = "results/layer_stats"


def probes_digest(probes: Sequence[Probe]) -> str:
    """A digest of in-memory probes (their text and image pixels), for a corpus that is no file."""
    h = hashlib.sha256()
    for p in probes:
        for item in (*p.context, p):
            h.update(item.text.encode() if hasattr(item, "text") else b"")
            image = item.image
            if image is not None:
                h.update(f"{image.mode}{image.size}".encode())
                h.update(image.tobytes())
        h.update(f"\0{p.prompt}\0{p.answer}\0".encode())
    return h.hexdigest()


def _capture_keys(vlm: VLM, layers: Sequence[int]) -> tuple[dict[int, Tensor], list]:
    """Forward pre-hooks that keep each layer's value-projection input (the keys) of the next forward."""
    captured: dict[int, Tensor] = {}
    handles = []
    for layer in layers:

        def hook(_m, args, layer=layer):
            captured[layer] = args[0]

        handles.append(vlm.ffn_ports(layer).value_linear.register_forward_pre_hook(hook))
    return captured, handles


@torch.no_grad()
def compute_second_moments(vlm: VLM, layers: Sequence[int], probes: Sequence[Probe]) -> dict[int, Tensor]:
    """E[k k^T] of the keys at `layers` (non-negative indices) over every real position of `probes`.

    Accumulated in float64 (a sum of many outer products loses digits in float32), returned float32.
    """
    if not probes:
        raise ValueError("layer statistics: the corpus holds no probes")
    sums: dict[int, Tensor] = {}
    count = 0
    order = sorted(range(len(probes)), key=lambda i: (probes[i].image is not None, len(probes[i].prompt)))
    captured, handles = _capture_keys(vlm, layers)
    try:
        for start in range(0, len(order), vlm.max_batch_size):
            chunk = [probes[i] for i in order[start : start + vlm.max_batch_size]]
            batch = vlm.build_batch(chunk)
            vlm.model(**batch.inputs, use_cache=False)
            mask = batch.inputs["attention_mask"].bool()
            for layer in layers:
                # OPT hands its FFN the rows flattened ([batch * seq, width]); the reshape covers both.
                keys = captured[layer].reshape(*mask.shape, -1)[mask].double()
                sums[layer] = sums.get(layer, 0) + keys.T @ keys
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {layer: (s / count).float().cpu() for layer, s in sums.items()}


def second_moments(
    vlm: VLM,
    layers: Sequence[int],
    corpus: dict[str, object],
    load_probes: Callable[[], list[Probe]],
    folder: str | Path | None = DEFAULT_STATS_DIR,
) -> tuple[dict[int, Tensor], list[int]]:
    """C per layer of `layers` (non-negative), read from `folder` where cached, else computed and cached.

    `corpus` describes what the probes are (file digest and loader settings); `load_probes` is only
    called when some layer has to be computed. Returns the moments and the layers that were computed
    now (empty when every moment came from the cache). `folder=None` caches nothing.
    """
    backbone = backbone_key(vlm)
    keys = {
        layer: {"backbone": backbone, "corpus": corpus, "layer": layer, "moment": "E[kk^T]"}
        for layer in layers
    }
    paths = {layer: Path(folder) / digest(key) if folder is not None else None for layer, key in keys.items()}
    moments: dict[int, Tensor] = {}
    for layer, path in paths.items():
        if (
            path is not None
            and path.with_suffix(".json").is_file()
            and path.with_suffix(".safetensors").is_file()
        ):
            stored = json.loads(path.with_suffix(".json").read_text())
            # The digest names the file; comparing the whole key guards against a (very unlikely) clash.
            if stored == json.loads(json.dumps(keys[layer], default=str)):
                moments[layer] = load_file(str(path.with_suffix(".safetensors")))["moment"]
    missing = [layer for layer in layers if layer not in moments]
    if missing:
        computed = compute_second_moments(vlm, missing, load_probes())
        for layer, moment in computed.items():
            moments[layer] = moment
            path = paths[layer]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".safetensors.tmp")
                save_file({"moment": moment.contiguous()}, str(tmp))
                tmp.rename(path.with_suffix(".safetensors"))
                # The key goes last: a moment without its key is never read back.
                path.with_suffix(".json").write_text(json.dumps(keys[layer], indent=1, default=str) + "\n")
    return {layer: moments[layer] for layer in layers}, missing
