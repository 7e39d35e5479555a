"""`python demo.py`: run every editing method on the shipped sample data and print one table.

Each method writes `results/demo/<method>/{cases.jsonl,summary.json}`; a second run resumes from
them, so it costs almost nothing. Until the synthetic world's trained backbone lands, the backbone is
a tiny randomly initialised LLaVA: the pipeline is real, the scores measure an untrained model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import edit
from callbacks.results_table import format_table

METHODS = ("ft_llm", "ft_vis", "ike")
ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="results folder (one subfolder per method)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods:
        results = Path(args.out) / method
        print(f"== {method} ==", flush=True)
        edit.main(
            [
                "test",
                "--config",
                str(ROOT / "configs" / "edit" / f"{method}.yaml"),
                "--trainer.logger",
                "false",
                "--results_dir",
                str(results),
            ]
        )
        rows.append((method, json.loads((results / "summary.json").read_text())))
    table = format_table(rows)
    print("\n" + table)
    return table


if __name__ == "__main__":
    main()
