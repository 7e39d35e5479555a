"""Edit time and peak memory per method, each method measured in a fresh process.

    python bench/edit_cost.py [--methods ft_llm ft_vis ike] [--cases 8] [--config OVERLAY.yaml ...]

For every method config, a child process builds the backbone and editor exactly as `edit.py test`
would (the same YAML files, stacked with any overlays given here), edits `--cases` cases one at a
time (apply, then restore), and reports the mean edit time, that time as a multiple of one forward
pass over the case's edit prompt (the unit in which per-edit costs compare across model sizes), and
the peak memory the editing added on top of the loaded model: resident memory on a CPU,
`torch.cuda.max_memory_allocated` on a GPU. The published per-edit times on LLMs (MEND, KE,
SERAC, T-Patcher, KN, CaliNet, ROME, MEMIT) are printed beside them for reference (they were
measured on other models and hardware).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ft_llm", "ft_vis", "ike")
#: Published per-edit times on LLMs (seconds), for reference only.
#: (The editing tutorial among the seeds, its CounterFact column; T-Patcher's is for a sequence
#: of edits with its step budget up to 2000; UniKE publishes no time, "a matter of seconds";
#: ROME and MEMIT: 147.2 s and 143.2 s on CounterFact, 183.0 s and 145.6 s on ZsRE; AlphaEdit is
#: not in the tutorial's table.)
PUBLISHED_EDIT_S = {
    "mend": 0.51,
    "ke": 2.20,
    "serac": 5.31,
    "tpatcher": 1864.74,
    "kn": 225.43,
    "calinet": 1.88,
    "rome": 147.2,
    "memit": 143.2,
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(configs: list[str], cases: int) -> dict[str, float | str]:
    """Run in the child: build, edit `cases` cases one by one, report time and peak memory."""
    sys.path.insert(0, str(ROOT))
    from lightning_modules.edit_cli import EditCLI

    args = [a for c in configs for a in ("--config", c)] + [
        "--trainer.logger",
        "false",
        "--data.limit",
        str(cases),
    ]
    cli = EditCLI(args=args, run=False)
    vlm, editor, data = cli.model.backbone, cli.model.editor, cli.datamodule
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vlm.to(device)
    data.setup("test")
    items = [data.dataset[i] for i in range(len(data.dataset))]
    editor.setup(vlm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mib()
    spent = []
    forward = []
    for case in items:
        start = time.perf_counter()
        with torch.no_grad():
            vlm.loss(case.edits)
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.enable_grad():
            handle = editor.apply(vlm, [case])
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        handle.restore()
    result: dict[str, float | str] = {
        "method": editor.name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params_m": sum(p.numel() for p in vlm.model.parameters()) / 1e6,
        "edit_s": sum(spent) / len(spent),
        "edit_s_first": spent[0],
        "forward_s": sum(forward) / len(forward),
        "model_mib": base if device.type == "cuda" else base_rss,
    }
    if device.type == "cuda":
        result["peak_extra_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        result["peak_extra_mib"] = _rss_mib() - base_rss
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--config", action="append", default=[], help="overlay config(s) after the method's")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(measure(args.worker, args.cases)))
        return
    rows = []
    for method in args.methods:
        configs = [str(ROOT / "configs" / "edit" / f"{method}.yaml"), *args.config]
        cmd = [sys.executable, __file__, "--cases", str(args.cases), "--worker", *configs]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{method}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[0][7:]))
    print(
        f"\n{'method':10}{'device':>12}{'params (M)':>12}{'edit s':>10}{'first s':>10}{'x forward':>11}"
        f"{'model MiB':>11}{'peak +MiB':>11}{'published s':>13}"
    )
    for r in rows:
        published = PUBLISHED_EDIT_S.get(str(r["method"]).split("_")[0])
        print(
            f"{r['method']:10}{r['device'][:12]:>12}{r['params_m']:>12.2f}{r['edit_s']:>10.4f}"
            f"{r['edit_s_first']:>10.4f}{r['edit_s'] / r['forward_s']:>11.1f}{r['model_mib']:>11.0f}"
            f"{r['peak_extra_mib']:>11.1f}{'-' if published is None else f'{published:.2f}':>13}"
        )
    print(
        "(x forward: edit time / one forward pass over the edit prompt; published s: the methods' papers, on LLMs)"
    )
    print("(peak +MiB: memory editing added on top of the loaded model; CPU: resident set, GPU: allocated)")


if __name__ == "__main__":
    main()
