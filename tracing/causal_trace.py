"""`python -m tracing.causal_trace`: trace a world backbone's facts, one heatmap per relation.

    python -m tracing.causal_trace --backbone checkpoints/world_llava --world data/world/demo --out docs/tracing

For each image relation of the world (country, maker, owner, material and the visual attributes)
it asks the training wordings about the entities of a split (validation by default: layer choices
are made there, never on the evaluation split) on fresh renderings, keeps the probes the backbone
answers correctly (as ROME traces known facts), and traces each under every corruption
(`tracing/tracer.py`). It writes `<relation>.png` per relation (`tracing/heatmap.py`), `traces.json`
with every mean and the settings, and prints where the effect peaks: per relation, corruption and
kind, the (group, layer) whose restoration brings back most of the answer's probability (indirect
effect = restored minus corrupted probability, averaged over probes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from backbones.base import VLM
from core.case import Probe
from tracing.heatmap import relation_heatmap
from tracing.tracer import CORRUPTIONS, KINDS, CausalTracer, ProbeTrace


def world_probes(world_dir: str, split: str, per_relation: int) -> dict[str, list[Probe]]:
    """Training-wording image questions per relation about `split`'s entities, fresh renderings."""
    from world.backbones import load_world
    from world.check import CHECK_ID
    from world.probes import image_questions, known_relations
    from world.render import render

    world = load_world(world_dir)
    out: dict[str, list[Probe]] = {}
    for entity in world.split(split):
        for rid, relation in enumerate(known_relations(entity)):
            for q, question in enumerate(image_questions(relation)):
                image = render(entity.look, world.config, entity.id, CHECK_ID + 10 * rid + q)
                out.setdefault(relation, []).append(Probe(question, entity.answer(relation), image))
    return {relation: probes[:per_relation] for relation, probes in out.items()}


def known(vlm: VLM, probes: Sequence[Probe]) -> list[Probe]:
    """The probes whose answer's first token the backbone predicts (teacher-forced argmax)."""
    outputs = vlm.teacher_forced(probes)
    return [
        p for p, o in zip(probes, outputs, strict=True) if len(o.pred) and int(o.pred[0]) == int(o.labels[0])
    ]


def summarise(traces: Sequence[ProbeTrace]) -> dict[str, object]:
    """Means over probes: clean, corrupted, restored per kind, and the peak of the indirect effect."""
    corrupted = sum(t.corrupted for t in traces) / len(traces)
    restored = {kind: torch.stack([t.restored[kind] for t in traces]).nanmean(0) for kind in KINDS}
    groups = traces[0].groups
    peaks = {}
    for kind, table in restored.items():
        effect = torch.nan_to_num(table - corrupted, nan=-math.inf)
        if kind == "resid":
            # Restoring the corrupted group's own input undoes the corruption: a trivial peak.
            effect[:, 0] = -math.inf
        g, column = divmod(int(effect.argmax()), table.shape[1])
        layer = ("emb" if column == 0 else column - 1) if kind == "resid" else column
        peaks[kind] = {
            "group": groups[g],
            "layer": layer,
            "p": table[g, column].item(),
            "effect": effect[g, column].item(),
        }
    # Where in the image and in the question the residual stream carries the answer (the last
    # token's late layers trivially do: they are the output).
    by_group = {}
    for g, name in enumerate(groups):
        effect = torch.nan_to_num(restored["resid"][g, 1:] - corrupted, nan=-math.inf)
        if torch.isfinite(effect).any():
            layer = int(effect.argmax())
            by_group[name] = {
                "layer": layer,
                "p": restored["resid"][g, layer + 1].item(),
                "effect": effect[layer].item(),
            }
    return {
        "resid_by_group": by_group,
        "n": len(traces),
        "clean": sum(t.clean for t in traces) / len(traces),
        "corrupted": corrupted,
        "groups": list(groups),
        "restored": {
            kind: [[None if math.isnan(v) else v for v in row] for row in t.tolist()]
            for kind, t in restored.items()
        },
        "peaks": peaks,
    }


def format_peaks(results: dict[str, dict[str, dict]]) -> str:
    """Per relation and corruption: the residual peak within the image and the question tokens, and
    the MLP and attention peaks over all groups, as group@layer p(answer) (+indirect effect)."""
    header = ("resid: image", "resid: question", "mlp", "attn")
    lines = [
        f"{'relation':9} {'corruption':12} {'n':>3} {'clean':>5} {'corr.':>5}  "
        + "  ".join(f"{h:>21}" for h in header),
        "-" * 128,
    ]
    for relation, parts in results.items():
        for corruption, s in parts.items():
            by_group = s["resid_by_group"]
            cells = [
                f"@{p['layer']} {p['p']:.2f} (+{p['effect']:.2f})" if p else "-"
                for p in (by_group.get("image"), by_group.get("question"))
            ]
            cells += [
                f"{p['group']}@{p['layer']} {p['p']:.2f} (+{p['effect']:.2f})"
                for p in (s["peaks"]["mlp"], s["peaks"]["attn"])
            ]
            lines.append(
                f"{relation:9} {corruption:12} {s['n']:>3} {s['clean']:>5.2f} {s['corrupted']:>5.2f}  "
                + "  ".join(f"{c:>21}" for c in cells)
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="checkpoints/world_llava", help="a saved world backbone folder")
    parser.add_argument("--world", default="data/world/demo", help="the world folder it was trained on")
    parser.add_argument("--out", default="docs/tracing", help="folder for the PNGs and traces.json")
    parser.add_argument("--split", default="val", choices=("train", "val", "eval"))
    parser.add_argument("--relations", nargs="+", default=None, help="relations to trace (default: all)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    parser.add_argument("--per_relation", type=int, default=28, help="probes per relation before filtering")
    parser.add_argument(
        "--noise_scale", type=float, default=3.0, help="noise std / the corrupted inputs' std"
    )
    parser.add_argument("--samples", type=int, default=3, help="noise draws per probe")
    parser.add_argument("--window", type=int, default=1, help="layers restored together for MLP/attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from world.check import load_backbone

    start = time.perf_counter()
    vlm = load_backbone(args.backbone)
    vlm.requires_grad_(False)
    probes = world_probes(args.world, args.split, args.per_relation)
    relations = args.relations or list(probes)
    missing = [r for r in relations if r not in probes]
    if missing:
        parser.error(f"--relations: {missing} not among the world's image relations {sorted(probes)}")
    kept = {r: known(vlm, probes[r]) for r in relations}
    tracers = {
        c: CausalTracer(vlm, c, args.noise_scale, args.samples, args.window, seed=args.seed)
        for c in args.corruptions
    }
    for tracer in tracers.values():
        tracer.calibrate([p for r in relations for p in kept[r]])
    results: dict[str, dict[str, dict]] = {}
    out = Path(args.out)
    with tqdm(total=sum(len(kept[r]) for r in relations) * len(tracers), desc="tracing", unit="trace") as bar:
        for relation in relations:
            if not kept[relation]:
                continue
            results[relation] = {}
            for corruption, tracer in tracers.items():
                traces = []
                for probe in kept[relation]:
                    traces.append(tracer.trace(probe))
                    bar.update()
                results[relation][corruption] = summarise(traces)
            relation_heatmap(relation, results[relation], out / f"{relation}.png", args.window)
    settings = {k: v for k, v in vars(args).items()}
    settings["noise_std"] = {c: t.input_std for c, t in tracers.items()}
    settings["probes"] = {r: {"asked": len(probes[r]), "known": len(kept[r])} for r in relations}
    (out / "traces.json").write_text(
        json.dumps({"settings": settings, "relations": results}, indent=1) + "\n"
    )
    print(
        f"traced {args.backbone} on {args.world} ({args.split} split) in {time.perf_counter() - start:.0f}s -> {out}"
    )
    print(format_peaks(results))
    return results


if __name__ == "__main__":
    main()
