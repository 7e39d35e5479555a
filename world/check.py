"""`python -m world.check --backbone checkpoints/world_llava --world data/world/demo`: what a backbone knows.

Loads the backbone through the family adapter's `pretrained=` path (as `edit.py` does) and scores it
on the evaluation split, teacher-forced token accuracy (TF) and greedy exact match (EM), with the
same functions the edit metrics use. Rows and the issue's targets:

- image questions on renderings never seen in training, held-out paraphrase wordings, text-only
  facts, the I-Loc questions of vqa_eval.json, and 1-hop composite questions: TF >= 95, EM >= 90;
- withheld facts (never trained): wrong >= 80% of the time (EM <= 20);
- the counterfactual edit targets of vqa_eval.json before any edit: Rel (TF) <= 5.

- in context (the world-fidelity targets: real instruction-tuned VLMs follow a fact they read): a
  counterfactual new fact given in context, asked again in a rephrased wording on the fact's own
  image or another rendering, is answered from the context (TF >= 95), alone ("New Fact" form) and
  after IKE's demonstrations; a question about something else under such a context keeps its
  memorised answer (TF >= 95); a 1-hop question through the in-context fact composes it with a
  memorised fact (TF >= 80).

Further rows (2..4-hop composites, captions, 2-hop composition through an in-context fact) are
reported without a target. `--json FILE` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from backbones import Blip2OptVLM, LlavaVLM
from backbones.base import VLM
from core.case import ContextItem, EditCase, Probe
from datamodules.dataset import load_edit_dataset
from editors.ike_pool import DemoFormats, record_demonstrations
from metrics.functional import exact_match, token_accuracy
from world.backbones import load_world
from world.generate import World
from world.probes import composite_questions, image_questions, known_relations, text_question, withheld_qas
from world.relations import CAPTION_TEMPLATES, EDITABLE, TEXT_TEMPLATES, WITHHOLDABLE
from world.render import FRESH_ID, render

#: Renderings for checking start here: above the pool and above every id the writers use.
CHECK_ID = FRESH_ID + 50_000
#: row -> (score, comparison, bound) for the rows with a target.
TARGETS = {
    "image questions (new renderings)": [("tf", ">=", 95), ("em", ">=", 90)],
    "held-out paraphrases": [("tf", ">=", 95), ("em", ">=", 90)],
    "text-only facts": [("tf", ">=", 95), ("em", ">=", 90)],
    "image locality (I-Loc)": [("tf", ">=", 95), ("em", ">=", 90)],
    "composite 1-hop": [("tf", ">=", 95), ("em", ">=", 90)],
    "withheld facts": [("em", "<=", 20)],
    "edit targets before editing (Rel)": [("tf", "<=", 5)],
    "in-context new fact (New Fact form)": [("tf", ">=", 95)],
    "in-context new fact (3 demonstrations)": [("tf", ">=", 95)],
    "in-context, unrelated question": [("tf", ">=", 95)],
    "in-context, unrelated (3 demonstrations)": [("tf", ">=", 95)],
    "in-context 1-hop composition": [("tf", ">=", 80)],
}
#: IKE's demonstrations in the rows "... (3 demonstrations)": copy, update and retain of one
#: training record (IKE's k = 3 takes one record's three), a record editing the same relation.
DEMONSTRATIONS = 3


def load_backbone(path: str) -> VLM:
    """The family adapter for a saved backbone, read off its config.json (`llava` or `blip-2`)."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        return LlavaVLM(pretrained=path)
    if model_type == "blip-2":
        return Blip2OptVLM(pretrained=path)
    raise ValueError(f"{path}: model_type {model_type!r} is neither 'llava' nor 'blip-2'")


def probe_sets(world: World, world_dir: str, split: str = "eval") -> dict[str, list[Probe]]:
    """Every row's probes. Each entity question gets its own fresh rendering."""
    next_id = {}

    def image(entity):
        rid = next_id.get(entity.id, CHECK_ID)
        next_id[entity.id] = rid + 1
        return render(entity.look, world.config, entity.id, rid)

    entities = world.split(split)
    sets: dict[str, list[Probe]] = {k: [] for k in TARGETS}
    for hops in (2, 3, 4):
        sets[f"composite {hops}-hop"] = []
    sets["captions"] = []
    for e in entities:
        for r in known_relations(e):
            sets["image questions (new renderings)"] += [
                Probe(q, e.answer(r), image(e)) for q in image_questions(r)
            ]
            if r in (*EDITABLE, *WITHHOLDABLE):
                held = image_questions(r, held_out=True)
                sets["held-out paraphrases"] += [Probe(q, e.answer(r), image(e)) for q in held]
        for q, a, _, hops in composite_questions(world, e):
            sets["composite 1-hop" if hops == 1 else f"composite {hops}-hop"].append(Probe(q, a, image(e)))
        sets["withheld facts"] += [Probe(q, a, image(e)) for q, a, _ in withheld_qas(e)]
        sets["captions"] += [Probe(q, world.caption(e), image(e)) for q in CAPTION_TEMPLATES[0]]
    for rel, s, a in world.text_facts():
        sets["text-only facts"] += [
            Probe(text_question(rel, s, v), a) for v in range(len(TEXT_TEMPLATES[rel][1]))
        ]
    data = load_edit_dataset(
        str(Path(world_dir) / "mmedit" / f"vqa_{split}.json"),
        str(Path(world_dir) / "images"),
        prompt_template="{}",
        loc_image_template="{}",
    )
    cases = [data[i] for i in range(len(data))]
    sets["image locality (I-Loc)"] = [p for c in cases for p in c.probes["i_loc"]]
    sets["edit targets before editing (Rel)"] = [c.edit for c in cases]
    # The VLKEB multi-hop file holds the same cases with their portability questions per hop.
    multihop = Path(world_dir) / "vlkeb" / f"{split}_multihop.json"
    if multihop.is_file():
        loaded = load_edit_dataset(
            str(multihop), str(Path(world_dir) / "images"), prompt_template="{}", loc_image_template="{}"
        )
        cases = [loaded[i] for i in range(len(loaded))]
    sets.update(in_context_sets(cases, demonstration_records(world_dir)))
    return sets


def demonstration_records(world_dir: str) -> list[EditCase]:
    """The editor-training split's cases, where IKE draws its demonstrations from."""
    data = load_edit_dataset(
        str(Path(world_dir) / "mmedit" / "vqa_train.json"),
        str(Path(world_dir) / "images"),
        prompt_template="{}",
        loc_image_template="{}",
    )
    return [data[i] for i in range(len(data))]


def _relation(case: EditCase) -> str:
    return case.case_id.rsplit("-", 1)[-1]


def in_context_sets(cases: list[EditCase], pool: list[EditCase]) -> dict[str, list[Probe]]:
    """The in-context rows, each probe asked as IKE asks it: context items, then "Prompt: ...".

    The new fact is the case's counterfactual edit with its image. It is asked again in the rephrased
    wording on the edit image (T-Gen) and on another rendering (I-Gen); the unrelated questions are
    the case's text and image locality probes; composition asks the case's 1-hop and 2-hop
    portability questions, whose answers follow from the new fact. Demonstrations come from the
    training split: a record of the same relation, chosen by the case's position (no retrieval, so
    the row does not depend on the backbone's embeddings).
    """
    formats = DemoFormats()
    by_relation: dict[str, list[EditCase]] = {}
    for record in pool:
        by_relation.setdefault(_relation(record), []).append(record)
    names = {
        "new": "in-context new fact",
        "unrelated": "in-context, unrelated",
    }
    sets: dict[str, list[Probe]] = {
        f"{names['new']} (New Fact form)": [],
        f"{names['new']} (3 demonstrations)": [],
        "in-context, unrelated question": [],
        f"{names['unrelated']} (3 demonstrations)": [],
        "in-context 1-hop composition": [],
        "in-context 2-hop composition": [],
    }
    for i, case in enumerate(cases):
        fact = ContextItem(formats.fact(case.edit), case.edit.image)
        same = by_relation.get(_relation(case)) or pool
        record = same[i % len(same)]
        demos = tuple(d.item for d in record_demonstrations(record, i, formats)[:DEMONSTRATIONS])

        def ask(probe: Probe, answer: str, context: tuple[ContextItem, ...]) -> Probe:
            return replace(probe, prompt=formats.query(probe.prompt), answer=answer, context=context)

        new = [case.probes["t_gen"][0], case.probes["i_gen"][0]]
        sets[f"{names['new']} (New Fact form)"] += [ask(p, case.edit.answer, (fact,)) for p in new]
        sets[f"{names['new']} (3 demonstrations)"] += [ask(p, case.edit.answer, (*demos, fact)) for p in new]
        unrelated = case.locality_probes()
        sets["in-context, unrelated question"] += [ask(p, p.answer, (fact,)) for p in unrelated]
        sets[f"{names['unrelated']} (3 demonstrations)"] += [
            ask(p, p.answer, (*demos, fact)) for p in unrelated
        ]
        for p in case.probes.get("port", []):
            if p.hop in (1, 2):
                sets[f"in-context {p.hop}-hop composition"].append(ask(p, p.answer, (fact,)))
    return sets


def score(vlm: VLM, probes: list[Probe]) -> dict[str, float]:
    tf = vlm.teacher_forced(probes)
    gen = vlm.generate(probes, teacher_forced=tf)
    n = max(1, len(probes))
    return {
        "n": len(probes),
        "tf": 100 * sum(token_accuracy(o.pred, o.labels) for o in tf) / n,
        "em": 100 * sum(exact_match(g, p.answer) for g, p in zip(gen, probes, strict=True)) / n,
    }


def passes(name: str, row: dict[str, float]) -> bool | None:
    if name not in TARGETS:
        return None
    return all(row[k] >= b if op == ">=" else row[k] <= b for k, op, b in TARGETS[name])


def check(backbone: str, world_dir: str, split: str = "eval") -> dict[str, dict]:
    vlm = load_backbone(backbone)
    world = load_world(world_dir)
    rows = {}
    for name, probes in probe_sets(world, world_dir, split).items():
        row = score(vlm, probes)
        row["pass"] = passes(name, row)
        rows[name] = row
    return rows


def format_rows(rows: dict[str, dict]) -> str:
    lines = [f"{'probe set':42} {'n':>5} {'TF':>6} {'EM':>6}  target", "-" * 78]
    for name, row in rows.items():
        target = ", ".join(f"{k.upper()} {op} {b}" for k, op, b in TARGETS.get(name, []))
        mark = "" if row["pass"] is None else ("  ok" if row["pass"] else "  MISSED")
        lines.append(f"{name:42} {row['n']:>5} {row['tf']:>6.1f} {row['em']:>6.1f}  {target}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="checkpoints/world_llava", help="a saved world backbone folder")
    parser.add_argument("--world", default="data/world/demo", help="the world folder it was trained on")
    parser.add_argument("--split", default="eval", choices=("train", "val", "eval"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = check(args.backbone, args.world, args.split)
    print(
        f"backbone {args.backbone} on {args.world} ({args.split} split), {time.perf_counter() - start:.0f}s"
    )
    print(format_rows(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
