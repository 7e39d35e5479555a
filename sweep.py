"""`python sweep.py configs/sweeps/ft_llm.yaml --evaluate configs/edit/world/llava.yaml`: a sweep, offline.

Reads a W&B sweep file, runs every point through `edit.py test` (resumable: finished points are not
rerun), picks the best by the file's metric on the split its command names, evaluates that point with
the `--evaluate` configs stacked on top, and writes the points table and plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeps.runner import run_sweep
from sweeps.spec import SweepSpecError, read_spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_file", help="a W&B sweep file (configs/sweeps/*.yaml)")
    parser.add_argument(
        "--evaluate", nargs="*", default=[], help="configs stacked on the best point to evaluate it"
    )
    parser.add_argument("--out", default=None, help="results folder (default results/sweeps/<file stem>)")
    parser.add_argument("--count", type=int, default=None, help="random draws (method random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.sweep_file)
    except SweepSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    out = Path(args.out or Path("results") / "sweeps" / Path(args.sweep_file).stem)
    best, evaluated, written = run_sweep(spec, out, args.evaluate, args.count, args.seed)
    print(f"\nbest point by {spec.metric} ({spec.goal}), tuned on the sweep's split:")
    for name, value in sorted(best.point.params.items()):
        print(f"  {name} = {value}")
    print(f"  {spec.metric} = {best.metric(spec.metric):.2f}")
    if evaluated is not None:
        scores = "  ".join(
            f"{k} {evaluated.summary.get(k)}"
            for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port", "avg")
        )
        print(f"evaluation ({', '.join(args.evaluate)}): {scores}")
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
