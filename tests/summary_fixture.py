"""The sample-data runs whose results must not change when the code is reshaped, and their fixture.

`python -m tests.summary_fixture --write` records, for each run below, the summary's score-bearing
fields and every case line of `cases.jsonl` in `tests/fixtures/summaries.json`;
`tests/test_summary_fixture.py` reruns them and compares. Timings and the resolved config (which
grows with new options) are left out: everything a result *says* is compared.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import edit

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "summaries.json"
EDIT = ROOT / "configs" / "edit"
DATA = ROOT / "configs" / "data"
BACKBONES = ROOT / "configs" / "backbones"

#: name -> extra edit.py arguments (after `test`); every run also limits the data to 6 cases.
RUNS: dict[str, list[str]] = {
    "ft_llm": ["--config", str(EDIT / "ft_llm.yaml")],
    "ft_vis": ["--config", str(EDIT / "ft_vis.yaml")],
    "ike": ["--config", str(EDIT / "ike.yaml")],
    "ft_llm_sequential_k3": [
        "--config",
        str(EDIT / "ft_llm.yaml"),
        "--config",
        str(EDIT / "sequential_k3.yaml"),
    ],
    "ike_sequential_k3": ["--config", str(EDIT / "ike.yaml"), "--config", str(EDIT / "sequential_k3.yaml")],
    "ft_llm_cross_task": ["--config", str(EDIT / "ft_llm.yaml"), "--config", str(EDIT / "cross_task.yaml")],
    "ft_llm_mmedit_trainer": ["--config", str(EDIT / "ft_llm.yaml"), "--model.protocol", "mmedit_trainer"],
    "ike_vlkeb_multihop": ["--config", str(EDIT / "ike.yaml"), "--config", str(DATA / "vlkeb_multihop.yaml")],
    "ft_vis_blip2": [
        "--config",
        str(EDIT / "ft_vis.yaml"),
        "--model.backbone",
        str(BACKBONES / "tiny_blip2_opt.yaml"),
    ],
}

#: Summary fields that hold what a run found (the rest are timings and the resolved config).
SUMMARY_FIELDS = (
    "rel", "t_gen", "i_gen", "t_loc", "i_loc", "port", "port_per_hop", "generation", "protocol", "mode",
    "n_cases", "n_skipped", "skipped", "backbone", "editor", "generated_rows_rank0",
)  # fmt: skip


def comparable(results_dir: Path) -> dict[str, Any]:
    """The summary's result fields and the case lines of one finished run."""
    summary = json.loads((results_dir / "summary.json").read_text())
    cases = [json.loads(line) for line in (results_dir / "cases.jsonl").read_text().splitlines()]
    return {"summary": {k: summary.get(k) for k in SUMMARY_FIELDS}, "cases": cases}


def run(name: str, out: Path) -> dict[str, Any]:
    results = out / name
    edit.main(
        ["test", *RUNS[name], "--data.limit", "6", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--results_dir", str(results)]
    )  # fmt: skip
    return comparable(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = {name: run(name, Path(tmp)) for name in RUNS}
    text = json.dumps(found, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if args.write:
        FIXTURE.write_text(text, encoding="utf-8")
        print(f"wrote {FIXTURE}")
    else:
        print(text[:2000])


if __name__ == "__main__":
    main()
