"""What UniKE's latent in-context knowledge costs a teacher-forced pass: hooks on versus off.

    python bench/latent_knowledge_cost.py [--sizes 1000 5000 20000] [--probes 64] [--repeat 5]
    python bench/latent_knowledge_cost.py --device cuda --dtype bfloat16

On the world backbone (`checkpoints/world_llava`, 4 layers x 128, Llama), a batch of `--probes`
probes of the world's VLKEB multi-hop evaluation file (every probe of the first cases, in order)
is scored with `VLM.teacher_forced`, first as it is, then with a `LatentKnowledge` of N random
entries on each of the 4 layers attached (D.3's top-40 and four layers; fixed alpha 0.5, and
adaptive alpha with a two-layer MLP standing in for Enc_Sem), for each N of `--sizes`. Printed:
best-of-`--repeat` wall time of each and their ratio, with one intra-op thread on a CPU (the
project's 2-core machines are shared). Then the arithmetic behind the ratio: per position and hooked
layer, the retrieval (2 x H x N multiply-adds' worth) and the knowledge attention against a decoder
layer's own work, for this backbone and for a LLaVA-1.5-7B-shaped one (H 4096, FFN 11008, 32 layers):
the retrieval is a matmul as wide as the memory, which dwarfs a 128-wide layer but not a 4096-wide one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from backbones import LlavaVLM
from core.case import Probe
from datamodules.dataset import load_edit_dataset
from editors.latent_knowledge import LatentKnowledge

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (-4, -3, -2, -1)
TOP_K = 40


def world_probes(n: int) -> list[Probe]:
    """The first `n` probes of the world's multi-hop evaluation cases (every kind, cases in order)."""
    data = load_edit_dataset(
        str(ROOT / "data/world/demo/vlkeb/eval_multihop.json"), str(ROOT / "data/world/demo/images")
    )
    probes: list[Probe] = []
    for i in range(len(data)):
        probes += [p for kind in data[i].probes.values() for p in kind]
        if len(probes) >= n:
            break
    return probes[:n]


def best_time(run, repeat: int, cuda: bool) -> float:
    run()  # warm-up: builds the memory's device copies and projections once
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def layer_flops(hidden: int, ffn: int, kv_width: int) -> float:
    """Multiply-adds x 2 of one Llama decoder layer per position, without the attention scores."""
    return 2.0 * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * ffn)


def hook_flops(hidden: int, heads: int, n: int, k: int) -> tuple[float, float]:
    """Per position and hooked layer: (retrieval, knowledge attention).

    The attention as `LatentKnowledge.read` computes it: q_proj, W_k folded onto the query, scores
    and mix over the K values in the state space per head, W_v, o_proj.
    """
    return 2.0 * hidden * n, 2.0 * (4 * hidden * hidden + 2 * heads * k * hidden)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    vlm = LlavaVLM(pretrained=str(ROOT / "checkpoints/world_llava")).to(device, dtype)
    vlm.requires_grad_(False)
    probes = world_probes(args.probes)
    batch = vlm.build_batch(probes)
    text = vlm.text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    positions = sum(batch.lengths)
    print(
        f"world backbone: {layers} layers x {hidden}, {len(probes)} probes, {positions} positions "
        f"(padded {batch.inputs['input_ids'].numel()}), {device.type} {args.dtype}, "
        f"{torch.get_num_threads()} thread(s), top-{TOP_K} on layers {list(LAYERS)}"
    )
    plain = best_time(lambda: vlm.teacher_forced(probes), args.repeat, cuda)
    print(f"teacher-forced pass without hooks: {plain * 1e3:.1f} ms\n")
    # Enc_Sem's stand-in: what the adaptive path costs, not what it computes.
    encoder = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)).to(device, dtype)

    def semantic(_layer: int, states: torch.Tensor) -> torch.Tensor:
        return encoder(states)

    print(f"{'N':>7}{'alpha':>10}{'hooked ms':>11}{'x plain':>9}")
    for n in args.sizes:
        keys = {layer: torch.randn(n, hidden) for layer in LAYERS}
        values = {layer: torch.randn(n, hidden) for layer in LAYERS}
        for alpha in (0.5, "adaptive"):
            memory = LatentKnowledge(vlm, LAYERS, keys, values, top_k=TOP_K, alpha=alpha, semantic=semantic)
            with memory.attach():
                hooked = best_time(lambda: vlm.teacher_forced(probes), args.repeat, cuda)
            print(f"{n:>7}{alpha!s:>10}{hooked * 1e3:>11.1f}{hooked / plain:>9.2f}")

    print("\nper position and hooked layer, as a share of one decoder layer's work (arithmetic):")
    print(f"{'model':>24}{'N':>7}{'retrieval':>11}{'attention':>11}{'4 hooked / all layers':>23}")
    ffn = int(text.intermediate_size)
    kv = int(text.num_key_value_heads) * hidden // int(text.num_attention_heads)
    heads = int(text.num_attention_heads)
    shapes = [
        ("world (128, 4 layers)", hidden, heads, ffn, kv, layers),
        ("LLaVA-1.5-7B-shaped", 4096, 32, 11008, 4096, 32),
    ]
    for name, h, n_heads, f, kv_width, depth in shapes:
        for n in args.sizes:
            retrieval, attention = hook_flops(h, n_heads, n, TOP_K)
            base = layer_flops(h, f, kv_width)
            extra = len(LAYERS) * (retrieval + attention) / (depth * base)
            print(f"{name:>24}{n:>7}{retrieval / base:>10.2f}x{attention / base:>10.2f}x{extra:>22.2f}x")


if __name__ == "__main__":
    main()
