"""`python demo.py`: the world demo. Build the world, train or load its backbone, edit with every method.

1. builds the demo world (configs/world/demo.yaml -> data/world/demo; cached: a second run reuses it);
2. loads the trained world backbone from checkpoints/world_<family>, or trains it first with
   `train.py fit --config configs/train/world_<family>.yaml` (about 5-10 minutes on 2 CPU cores);
3. runs `edit.py test` for every method on the world's evaluation split (VLKEB multi-hop layout) and
   prints one table: methods as rows, the six scores and their generation twins as columns;
4. writes the report (`report.py`): the table as Markdown and CSV and the plots, in
   `results/demo/<family>/report/`.

Each method writes `results/demo/<family>/<method>/{cases.jsonl,summary.json}`; a rerun resumes from
them, so it costs almost nothing (--fresh starts over, e.g. after retraining the backbone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import edit
import train
from callbacks.results_table import format_table
from reporting.collect import read_row
from reporting.report import write_report
from world.build import build_world
from world.config import load_world_config

METHODS = (
    "ft_llm", "ft_vis", "ike", "mend", "ke", "serac", "tpatcher", "unike",
    "kn", "calinet", "rome", "memit", "alphaedit",
)  # fmt: skip
#: Methods whose trained editor checkpoints (checkpoints/editors/*_world_<family>.safetensors,
#: checkpoints/unike/encoders_world_<family>.safetensors) exist only for the LLaVA-style world
#: backbone; other families run the untrained methods.
TRAINED = {"mend": "llava", "ke": "llava", "serac": "llava", "unike": "llava"}
#: Methods whose memory of unrelated inputs (T-Patcher, UniKE) or key statistics corpus (ROME,
#: MEMIT, AlphaEdit) comes from the world's training split.
TRAIN_MEMORY = ("tpatcher", "unike", "rome", "memit", "alphaedit")
FAMILIES = ("llava", "blip2")
ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"


def ensure_backbone(family: str, retrain: bool = False) -> Path:
    """The trained world backbone's folder, training it first when it is missing (or when asked)."""
    out = ROOT / "checkpoints" / f"world_{family}"
    if retrain or not (out / "config.json").is_file():
        print(f"== training the {family} world backbone (python train.py fit --config "
              f"configs/train/world_{family}.yaml) ==", flush=True)  # fmt: skip
        train.main(["fit", "--config", str(CONFIGS / "train" / f"world_{family}.yaml")])
    else:
        print(f"world backbone: using {out.relative_to(ROOT)}", flush=True)
    return out


def run_method(method: str, family: str, results: Path) -> dict:
    configs = [CONFIGS / "edit" / f"{method}.yaml", CONFIGS / "edit" / "world" / f"{family}.yaml"]
    if method == "ike":
        configs.append(CONFIGS / "edit" / "world" / "ike_pool.yaml")
    if method in TRAIN_MEMORY:
        configs.append(CONFIGS / "edit" / "world" / "train_memory.yaml")
    if method == "unike":
        # UniKE's knowledge: the backbone's wrong answers mined as triplets and their states (cached
        # in data/unike/world_<family>: about 1.5 minutes the first time, seconds after).
        from knowledge.mine import main as mine

        mine(["--config", str(CONFIGS / "knowledge" / f"world_{family}.yaml")])
    args = ["test", *(a for c in configs for a in ("--config", str(c)))]
    edit.main([*args, "--trainer.logger", "false", "--results_dir", str(results)])
    return json.loads((results / "summary.json").read_text())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="results folder (one subfolder per method)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--family", default="llava", choices=FAMILIES, help="which world backbone to edit")
    parser.add_argument("--retrain", action="store_true", help="train the backbone even if it is saved")
    parser.add_argument("--fresh", action="store_true", help="drop earlier results instead of resuming")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    build_world(load_world_config(CONFIGS / "world" / "demo.yaml"), ROOT / "data" / "world" / "demo")
    ensure_backbone(args.family, args.retrain)
    rows = []
    methods = [m for m in args.methods if TRAINED.get(m, args.family) == args.family]
    for method in methods:
        results = Path(args.out) / args.family / method
        if args.fresh or args.retrain:
            shutil.rmtree(results, ignore_errors=True)
        print(f"== {method} ==", flush=True)
        rows.append((method, run_method(method, args.family, results)))
    table = format_table(rows)
    print(f"\nworld demo, {args.family}-style backbone ({time.perf_counter() - start:.0f}s)\n{table}")
    report = Path(args.out) / args.family / "report"
    written = write_report(
        [read_row(Path(args.out) / args.family / m / "summary.json", m) for m in methods], report
    )
    print("plots and tables: " + ", ".join(str(p) for p in written))
    return table


if __name__ == "__main__":
    main()
