"""`edit.py test` with its default offline W&B logger leaves a run folder holding the per-case table and its images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageChops

from datamodules.edit_datamodule import EditDataModule

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def test_offline_run_folder_holds_the_case_table_and_images(tmp_path):
    results = tmp_path / "results"
    # A process of its own, as a user runs it: its exit finishes the W&B run (flushing the record),
    # and no run left open by another test in this process can be reused by the logger.
    args = ["test", "--config", str(ROOT / "configs" / "edit" / "ft_llm.yaml"),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "wb"),
            "--model.editor.init_args.steps", "2", "--data.limit", "3", "--results_dir", str(results)]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, "edit.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")), "no offline run record"
    (table_file,) = (run_dir / "files" / "media" / "table").glob("cases_*.table.json")
    table = json.loads(table_file.read_text())
    cases = {
        json.loads(x)["case_id"]: json.loads(x) for x in (results / "cases.jsonl").read_text().splitlines()
    }
    assert [row[0] for row in table["data"]] == list(cases)
    rel = table["columns"].index("rel")
    for row in table["data"]:
        assert row[rel] == round(100 * cases[row[0]]["scores"]["rel"], 2)
    record = (run_dir / f"run-{run_dir.name.rsplit('-', 1)[-1]}.wandb").read_bytes()
    assert b"case_images" in record and b"cases" in record
    # The thumbnails in the run folder are the cases' edit images.
    data = EditDataModule(str(SAMPLE / "mmedit" / "vqa_eval.json"), str(SAMPLE / "images"), limit=3)
    data.setup("test")
    expected = []
    for i in range(3):
        image = data.dataset[i].edit.image.copy()
        image.thumbnail((128, 128))
        expected.append(image)
    found = sorted((run_dir / "files" / "media" / "images").glob("case_images_*.png"))
    assert len(found) == 3
    for path in found:
        with Image.open(path) as png:
            rgb = png.convert("RGB")
            assert any(
                rgb.size == e.size and ImageChops.difference(rgb, e.convert("RGB")).getbbox() is None
                for e in expected
            ), path
    assert list((run_dir / "files" / "media" / "images" / "plots").glob("radar_*.png"))
