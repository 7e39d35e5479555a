"""Teacher-forced scoring with and without shared prompt prefixes, on a randomly initialised LLaVA.

    python bench/prefix_sharing.py                       # tiny sizes, CPU: a quick sanity check
    python bench/prefix_sharing.py --llava-shaped --dtype bfloat16 --device cuda

Two probe sets of `--cases` cases with five probes each (Rel, T-Gen, I-Gen, T-Loc, I-Loc): IKE-style
(k demonstrations with their own pictures and the new fact before every probe) and LLaVA-style (no
context; Rel and T-Gen share the edit picture). For each: tokens a plain pass runs and tokens the
shared passes run, best-of-3 wall time of `VLM.teacher_forced` both ways, peak GPU memory, and how
many probes' argmax predictions agree. Then, in float32, the largest logit difference between the
two ways. `--llava-shaped` gives LLaVA-1.5's 576 image tokens per picture and a 4096-wide LM (8
layers, so it builds in seconds); the byte tokenizer keeps the vocabulary small.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from backbones import LlavaVLM, TinySpec
from backbones.prefix_cache import plan_chunk, row_logits
from core.case import ContextItem, Probe


def picture(i: int) -> Image.Image:
    return Image.new("RGB", (64, 48), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def probe_set(n_cases: int, k: int) -> list[Probe]:
    """`k` > 0: IKE-style probes behind k demonstrations and the new fact; 0: no context."""
    probes = []
    for c in range(n_cases):
        edit = picture(1000 + c)
        context: tuple[ContextItem, ...] = ()
        if k:
            context = tuple(
                ContextItem(
                    f"New Fact: Question: What is shown {c}-{d}? Short answer: thing{d}\n"
                    f"Prompt: Question: What is shown? Short answer: thing{d}",
                    picture(10 * c + d),
                )
                for d in range(k)
            )
            context += (
                ContextItem(f"New Fact: Question: What is this landmark? Short answer: Rome{c}", edit),
            )
        q = "Prompt: Question:" if k else "Question:"
        probes += [
            Probe(f"{q} What is this landmark? Short answer:", f"Rome{c}", edit, context=context),
            Probe(f"{q} Which city is it in? Short answer:", f"Rome{c}", edit, "t_gen", context=context),
            Probe(
                f"{q} What is this landmark? Short answer:",
                f"Rome{c}",
                picture(2000 + c),
                "i_gen",
                context=context,
            ),
            Probe(f"{q} who wrote hamlet? Short answer:", "shakespeare", None, "t_loc", context=context),
            Probe(
                f"{q} What shape is shown? Short answer:",
                "square",
                picture(3000 + c),
                "i_loc",
                context=context,
            ),
        ]
    return probes


def timed(vlm: LlavaVLM, probes: list[Probe], share: bool) -> tuple[float, float, list]:
    vlm.share_prefixes = share
    vlm.teacher_forced(probes)  # warm-up
    cuda = vlm.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best, out = float("inf"), []
    for _ in range(3):
        start = time.perf_counter()
        out = vlm.teacher_forced(probes)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llava-shaped", action="store_true", help="576 image tokens, 4096-wide LM")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="IKE demonstrations per case")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spec = TinySpec()
    if args.llava_shaped:
        spec = TinySpec(4096, 8, 1024, 4, image_size=336, patch_size=14, num_heads=32)
    vlm = LlavaVLM(tiny=spec, dtype=args.dtype)
    vlm.model.to(args.device)
    print(f"LLaVA {sum(p.numel() for p in vlm.model.parameters()) / 1e9:.2f}B, {args.dtype}, {args.device}")
    for name, k in ((f"IKE k={args.k}", args.k), ("LLaVA-style", 0)):
        probes = probe_set(args.cases, k)
        plan = plan_chunk(vlm, probes)
        prefixes = {id(node): node.length for node in plan.prefixes if node is not None}
        plain = sum(len(r.ids) for r in plan.rows)
        shared = plain - sum(node.length if node else 0 for node in plan.prefixes) + sum(prefixes.values())
        off, off_mem, ref = timed(vlm, probes, False)
        on, on_mem, got = timed(vlm, probes, True)
        agree = sum(torch.equal(a.pred, b.pred) for a, b in zip(ref, got, strict=True))
        print(
            f"{name}: {len(probes)} probes, {len(prefixes)} shared prefixes, tokens {plain} -> {shared}; "
            f"plain {off * 1e3:.1f} ms ({off_mem:.1f} GiB), shared {on * 1e3:.1f} ms ({on_mem:.1f} GiB), "
            f"{off / on:.2f}x; predictions equal {agree}/{len(probes)}"
        )
    vlm.model.float()
    for name, k in ((f"IKE k={args.k}", args.k), ("LLaVA-style", 0)):
        probes = probe_set(2, k)
        batch = vlm.build_batch(probes)
        with torch.inference_mode():
            full = vlm.logits(batch)
        got = row_logits(vlm, probes)
        diff = max((full[i, : batch.lengths[i]] - g).abs().max().item() for i, g in enumerate(got))
        print(f"float32 {name}: largest |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
