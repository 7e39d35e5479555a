"""Precision and recall of SERAC's scope classifier on an edit split: who would answer each probe?

For every case the memory holds its edit (`--memory 1`, one-step editing) or the edits of the K
cases of its sequential group (`--memory K`, consecutive cases as `--data.batch_size K` groups them).
A probe counts as

- **in scope** when its kind is Rel, T-Gen or I-Gen (portability is reported per kind only: whether
  a multi-hop question belongs to the edit is a choice, not a fact of the data);
- **out of scope** when it is T-Loc or I-Loc;
- a **true positive** only when it is in scope and matched to its own case's edit (another entry
  of a K-edit memory is counted as `wrong_entry`, and not as a hit).

Precision = TP / probes routed to the counterfactual model (in or out of scope), recall = TP / in
scope probes. Run it on the same config stack as `edit.py test`:

    python -m editors.serac_scope_report --config configs/edit/serac.yaml \\
        --config configs/edit/world/llava.yaml --memory 1 10 20 --out results/serac_scope.json

Both routings (`image_text`, `text`) are reported unless `--routing` names one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from backbones.base import VLM
from core.case import EditCase
from editors.serac import SERAC
from editors.serac_scope import ROUTINGS

IN_SCOPE = ("rel", "t_gen", "i_gen")
OUT_OF_SCOPE = ("t_loc", "i_loc")


def scope_report(editor: SERAC, vlm: VLM, cases: Sequence[EditCase], memory: int = 1) -> dict[str, Any]:
    """Routing precision / recall of `editor` (with its current `routing`) over `cases`.

    Returns counts, `precision`, `recall`, `wrong_entry`, and `routed` (share of each probe kind
    sent to the counterfactual model), in percent where a share.
    """
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    routed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    tp = fp = wrong = 0
    for start in range(0, len(cases), memory):
        group = list(cases[start : start + memory])
        probes = [p for c in group for p in c.all_probes()]
        owners = [i for i, c in enumerate(group) for _ in c.all_probes()]
        # Memory entries are the group's edits in order; a case may add extra edits (VLKEB one-hop).
        entry_owner = [i for i, c in enumerate(group) for _ in c.edits]
        decisions = editor.scope_decisions(vlm, group, probes)
        for probe, owner, decision in zip(probes, owners, decisions, strict=True):
            total[probe.kind] += 1
            if decision.entry is None:
                continue
            routed[probe.kind] += 1
            if probe.kind in IN_SCOPE:
                if entry_owner[decision.entry] == owner:
                    tp += 1
                else:
                    wrong += 1
            elif probe.kind in OUT_OF_SCOPE:
                fp += 1
    n_in = sum(total[k] for k in IN_SCOPE)
    n_routed = tp + wrong + fp
    return {
        "routing": editor.routing,
        "memory": memory,
        "cases": len(cases),
        "in_scope_probes": n_in,
        "out_of_scope_probes": sum(total[k] for k in OUT_OF_SCOPE),
        "true_positives": tp,
        "false_positives": fp,
        "wrong_entry": wrong,
        "precision": 100.0 * tp / n_routed if n_routed else float("nan"),
        "recall": 100.0 * tp / n_in if n_in else float("nan"),
        "routed": {k: 100.0 * routed[k] / total[k] for k in total},
    }


def format_rows(reports: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of reports, one line each."""
    kinds = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port")
    head = f"{'routing':<11}{'memory':>7}{'precision':>10}{'recall':>8}{'wrong':>7}  " + "".join(
        f"{k:>7}" for k in kinds
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        shares = "".join(f"{r['routed'].get(k, float('nan')):>7.1f}" for k in kinds)
        lines.append(
            f"{r['routing']:<11}{r['memory']:>7}{r['precision']:>10.1f}{r['recall']:>8.1f}{r['wrong_entry']:>7}  {shares}"
        )
    lines.append("(precision, recall in %; per kind: % of probes routed to the counterfactual model)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="edit config(s), as edit.py test")
    parser.add_argument("--memory", type=int, nargs="+", default=[1], help="edits in memory (1: one-step)")
    parser.add_argument("--routing", choices=ROUTINGS, nargs="+", default=list(ROUTINGS))
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases")
    parser.add_argument("--out", default=None, help="write the reports as JSON here")
    args = parser.parse_args(argv)

    # Imported here: the report reuses edit.py's whole config stack (backbone, editor, data).
    from lightning_modules.edit_cli import EditCLI

    cli_args = [a for c in args.config for a in ("--config", c)] + ["--trainer.logger", "false"]
    # LightningCLI warns when it is given args while sys.argv holds others (this script's own).
    argv_before, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = EditCLI(args=cli_args, run=False)
    finally:
        sys.argv = argv_before
    vlm, editor, data = cli.model.backbone, cli.model.editor, cli.datamodule
    if not isinstance(editor, SERAC):
        parser.error(f"the config's editor is {type(editor).__name__}, not SERAC")
    data.setup("test")
    dataset = data.dataset
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    cases = [c for c in (dataset[i] for i in range(n)) if c.skip_reason is None]
    editor.setup(vlm)
    reports = []
    with torch.inference_mode():
        for routing in args.routing:
            editor.routing = routing
            for memory in args.memory:
                reports.append(scope_report(editor, vlm, cases, memory))
    print(format_rows(reports))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
