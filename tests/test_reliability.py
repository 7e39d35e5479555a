"""Reliability through the real entry point: bad input, interrupted runs, determinism.

Every bad-input case runs `edit.main([...])` as a user would and must end either in one clear error
line (file, record index and id, field; exit status 2) or in a counted skip whose reason reaches
summary.json. Interrupted runs are killed with SIGKILL and rerun; determinism compares the bytes of
cases.jsonl between runs, and between one process and two under DDP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import edit
from backbones import LlavaVLM, TinySpec
from backbones.base import VLM
from core.case import EditCase
from datamodules.records import BadRecordError
from editors.base import Editor, ParameterSnapshot, WeightEditHandle
from editors.checkpoint import META_KEY, EditorCheckpointError, load_editor_checkpoint, save_editor_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
FT_CONFIG = ROOT / "configs" / "edit" / "ft_llm.yaml"
BASE_CONFIG = ROOT / "configs" / "edit" / "base.yaml"  # no editor: for the checkpointed test editor
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
#: Small and fast: one FT step, no generation twins, cases written one by one.
FAST = ["--model.editor.init_args.steps", "1", "--model.generation", "false", "--data.batch_size", "1"]
IDS = ["case-a", "case-b"]


# --- a checkpointed editor: what MEND/KE/SERAC will look like to the loop -------------------------------


class ShiftEditor(Editor):
    """Adds trained per-parameter shifts, loaded from an editor checkpoint, to the targeted weights.

    A stand-in for the trainable editors to come: it loads its weights the way they will (through
    `load_editor_checkpoint` with the backbone's fingerprint), so the CLI's handling of a checkpoint
    for another backbone or with diverged weights is tested end to end.
    """

    name = "shift"

    def __init__(self, checkpoint: str, targets: list[str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.targets = list(targets or ["ffn:-1"])
        self.shifts: dict[str, torch.Tensor] = {}

    def setup(self, vlm: VLM) -> None:
        self.shifts, _ = load_editor_checkpoint(
            self.checkpoint, vlm.fingerprint(*self.targets), editor=type(self).__name__
        )

    def apply(self, vlm: VLM, cases: list[EditCase]) -> WeightEditHandle:
        params = vlm.parameter_group(*self.targets)
        snapshot = ParameterSnapshot(params)
        with torch.no_grad():
            for name, p in params.items():
                p.add_(self.shifts[name].to(p))
        return WeightEditHandle(snapshot)


def _shift_checkpoint(path: Path, vlm: VLM, bad: float | None = None) -> Path:
    params = vlm.parameter_group("ffn:-1")
    state = {name: torch.full(p.shape, 1e-3) for name, p in params.items()}
    meta = {"editor": "ShiftEditor", "backbone": vlm.fingerprint("ffn:-1")}
    if bad is None:
        return save_editor_checkpoint(path, state, meta)
    # A diverged run's file, written by something other than save_editor_checkpoint (which refuses it).
    next(iter(state.values())).view(-1)[0] = bad
    save_file(state, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


# --- running the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    shutil.copytree(SAMPLE / "images", root, dirs_exist_ok=True)
    return root


def _records(base: str, n: int = 2) -> list[dict[str, Any]]:
    source = {"vqa": "mmedit/vqa_eval.json", "multihop": "vlkeb/eval_multihop.json"}[base]
    records = json.loads((SAMPLE / source).read_text(encoding="utf-8"))[:n]
    for rec, id_ in zip(records, IDS, strict=False):
        rec["id"] = id_
    return records


def run_cli(workdir: Path, *args: str, config: Path = FT_CONFIG) -> dict[str, Any]:
    """`edit.py test` in-process; returns summary.json. SystemExit from a refused run propagates."""
    results = workdir / "results"
    edit.main(["test", "--config", str(config), *QUIET, "--results_dir", str(results), *args])
    return json.loads((results / "summary.json").read_text())


def _data_args(annotation: Path, image_root: Path, policy: str) -> list[str]:
    return [
        "--data.annotation_file",
        str(annotation),
        "--data.image_root",
        str(image_root),
        "--data.on_bad_record",
        policy,
    ]


# --- the bad-input cases ------------------------------------------------------------------------------

Mutation = Callable[[list[dict[str, Any]], Path, Path], Any]


@dataclass
class BadCase:
    """One bad (or unusual) input.

    `outcome`: `record` (an error naming file/record/id/field under policy error, a counted skip under
    skip; images that only fail when decoded are found in the loader and skipped there), `file` (an
    error under either policy: there is no record to skip), `ok` (must work).
    `mutate(records, image_root, tmp)` returns the records (or raw bytes) to write; `args` are extra
    CLI arguments, built from the same three paths.
    """

    name: str
    outcome: str
    mutate: Mutation
    field: str | None = None
    message: str = ""
    base: str = "vqa"
    args: Callable[[Path, Path], list[str]] = lambda root, tmp: []
    file_name: str = "vqa_eval.json"
    case_id: str = "case-b"


def _set(key: str, value: Any, index: int = 1) -> Mutation:
    def mutate(records, root, tmp):
        records[index][key] = value
        return records

    return mutate


def _image(
    name: str,
    make: Callable[[Image.Image, Path], None],
    key: str = "image_rephrase",
    modes: tuple[str, ...] = (),
) -> Mutation:
    """Write an image derived from record 1's edit image under the root and point `key` at it.

    `modes`: what Pillow must read the written file back as, so the case tests the mode it names.
    """

    def mutate(records, root, tmp):
        source = Image.open(root / records[1]["image"]).convert("RGB")
        make(source, root / "made" / name)
        if modes:
            with Image.open(root / "made" / name) as written:
                assert written.mode in modes, written.mode
        records[1][key] = f"made/{name}"
        return records

    return mutate


def _save(mode_or_fn: Any, fmt: str) -> Callable[[Image.Image, Path], None]:
    def make(img: Image.Image, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = mode_or_fn(img) if callable(mode_or_fn) else img.convert(mode_or_fn)
        out.save(path, format=fmt)

    return make


def _truncated(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 10)


def _sixteen_bit(img: Image.Image) -> Image.Image:
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey)  # mode I;16


def _palette(img: Image.Image) -> Image.Image:
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    return pal


def _malformed_port(records, root, tmp):
    records[1]["port_new"] = [{"port_type": "several hops", "Q&A": {"Question": "Where?", "Answer": "Here"}}]
    return records


def _duplicate_ids(records, root, tmp):
    records[1]["id"] = records[0]["id"]
    return records


def _decompression_bomb(records, root, tmp):
    big = root / "made" / "bomb.png"
    big.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 100), (9, 9, 9)).save(big)
    records[1]["m_loc"] = "made/bomb.png"
    return records


LONG = "why is the sky this colour " * 45  # ~1200 byte tokens: more than the tiny model's 1024 positions

BAD_CASES = [
    BadCase("invalid_json", "file", lambda r, root, tmp: b'[{"src": "a", ', message="invalid JSON at line 1"),
    BadCase("not_a_list", "file", lambda r, root, tmp: {"records": r}, message="expected a JSON list"),
    BadCase("not_utf8", "file", lambda r, root, tmp: '[{"src": "café"}]'.encode("latin-1"), message="not valid UTF-8"),
    BadCase("record_not_object", "record", lambda r, root, tmp: [r[0], ["src"]], message="expected a JSON object",
            case_id="vqa_eval:1"),
    BadCase("missing_field", "record", lambda r, root, tmp: [r[0], {k: v for k, v in r[1].items() if k != "rephrase"}],
            field="rephrase", message="missing required field"),
    BadCase("wrong_type", "record", _set("alt", 42), field="alt", message="expected a string, got int"),
    BadCase("empty_target", "record", _set("alt", " "), field="alt", message="is empty"),
    BadCase("missing_image", "record", _set("image_rephrase", "coco/val2014/nope.png"), field="image_rephrase",
            message="does not exist"),
    BadCase("escaping_path", "record", _set("image", "../../etc/hostname"), field="image",
            message="leaves the image root"),
    BadCase("absolute_path", "record", _set("m_loc", "/etc/hostname"), field="m_loc", message="is absolute"),
    BadCase("malformed_port_new", "record", _malformed_port, field="port_new[0].port_type",
            message="expected a hop type like '1-hop'", base="multihop", file_name="eval_multihop.json"),
    BadCase("duplicate_ids", "record", _duplicate_ids, field="id", message="duplicate case id 'case-a'",
            case_id="case-a"),
    BadCase("prompt_too_long", "record", _set("src", LONG), field="rel prompt",
            message="more than the model's 1024 positions"),
    BadCase("locality_prompt_too_long", "record", _set("loc", LONG), field="t_loc prompt",
            message="more than the model's 1024 positions"),
    BadCase("truncated_image", "record", _image("cut.png", _truncated), field="image_rephrase",
            message="cannot decode image file"),
    BadCase("corrupt_image", "record", _image("junk.png", _corrupt), field="image_rephrase",
            message="cannot decode image file"),
    BadCase("decompression_bomb", "record", _decompression_bomb, field="m_loc", message="max_image_pixels=10000",
            args=lambda root, tmp: ["--data.max_image_pixels", "10000"]),
    BadCase("cmyk_image", "ok", _image("cmyk.jpg", _save("CMYK", "JPEG"), modes=("CMYK",))),
    BadCase("sixteen_bit_image", "ok", _image("grey16.png", _save(_sixteen_bit, "PNG"), key="image",
                                              modes=("I;16", "I"))),
    BadCase("palette_image", "ok", _image("palette.png", _save(_palette, "PNG"), key="m_loc", modes=("P",))),
]  # fmt: skip


def _bad_params() -> list[Any]:
    params = []
    for case in BAD_CASES:
        policies = ["error"] if case.outcome == "ok" else ["error", "skip"]
        params += [pytest.param(case, policy, id=f"{case.name}-{policy}") for policy in policies]
    return params


@pytest.mark.parametrize("case, policy", _bad_params())
def test_bad_input(tmp_path, monkeypatch, capsys, image_root, case: BadCase, policy: str):
    monkeypatch.chdir(tmp_path)  # the config Lightning saves goes here, not into the repository
    records = case.mutate(_records(case.base), image_root, tmp_path)
    annotation = tmp_path / case.file_name
    annotation.write_bytes(records if isinstance(records, bytes) else json.dumps(records).encode())
    args = [*FAST, *_data_args(annotation, image_root, policy), *case.args(image_root, tmp_path)]

    if case.outcome == "ok":
        summary = run_cli(tmp_path, *args)
        assert summary["n_cases"] == 2 and summary["n_skipped"] == 0
        assert summary["rel"] is not None
        return
    if case.outcome == "record" and policy == "skip":
        summary = run_cli(tmp_path, *args)
        assert summary["n_skipped"] == 1 and summary["n_cases"] == 1, summary["skipped"]
        (skip,) = summary["skipped"]
        assert skip["file"] == str(annotation) and skip["index"] == 1 and skip["field"] == case.field
        assert case.message in skip["message"] and skip["id"] == case.case_id
        lines = [json.loads(line) for line in (tmp_path / "results" / "cases.jsonl").read_text().splitlines()]
        scored = [line["case_id"] for line in lines if "scores" in line]
        assert scored == ["case-a"]  # the good record is still scored, once
        return

    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *args)
    assert exit_info.value.code == 2
    cause = exit_info.value.__cause__
    assert isinstance(cause, BadRecordError), repr(cause)
    message = capsys.readouterr().err.strip().splitlines()[-1]  # one line, not a traceback
    assert message == f"error: {cause}"
    assert str(annotation) in message and case.message in message, message
    if case.outcome == "file":
        assert cause.index is None
        return
    assert (cause.file, cause.index, cause.case_id, cause.field) == (
        str(annotation),
        1,
        case.case_id,
        case.field,
    )
    assert f"record 1, id {case.case_id!r}" in message, message
    assert case.field is None or f"field {case.field!r}" in message, message


def test_skipped_long_prompt_is_kept_across_a_resume(tmp_path, monkeypatch, image_root):
    # The skip is a line of cases.jsonl: a rerun (or rank 0 of a DDP run) reports it without
    # recomputing it, and the summary stays the same.
    monkeypatch.chdir(tmp_path)
    records = _set("src", LONG)(_records("vqa"), image_root, tmp_path)
    annotation = tmp_path / "vqa_eval.json"
    annotation.write_text(json.dumps(records))
    args = [*FAST, *_data_args(annotation, image_root, "skip")]
    first = run_cli(tmp_path, *args)
    lines = (tmp_path / "results" / "cases.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == IDS
    assert json.loads(lines[1])["skipped"]["field"] == "rel prompt"
    second = run_cli(tmp_path, *args)
    assert second["n_resumed_rank0"] == 2
    assert (tmp_path / "results" / "cases.jsonl").read_text().splitlines() == lines
    assert {k: second[k] for k in ("rel", "n_cases", "n_skipped", "skipped")} == {
        k: first[k] for k in ("rel", "n_cases", "n_skipped", "skipped")
    }


# --- configuration, checkpoints and the results folder -----------------------------------------------

CONFIG_ERRORS = [
    # name, arguments (a YAML body is written to a file and passed with --config), what stderr names
    ("unknown_backbone", ["--model.backbone.class_path", "backbones.NoSuchVLM"], ["model.backbone", "NoSuchVLM"]),
    ("unknown_editor", ["--model.editor.class_path", "editors.NoSuchEditor"], ["model.editor", "NoSuchEditor"]),
    ("typo_in_flag", ["--model.edtor", "x"], ["unrecognized arguments", "--model.edtor"]),
    ("typo_in_yaml_key", "data:\n  batch_sise: 2\n", ["data.batch_sise"]),
    ("typo_in_init_arg", "model:\n  editor:\n    class_path: editors.FineTune\n    init_args:\n      stepz: 3\n",
     ["model.editor", "stepz"]),
]  # fmt: skip


@pytest.mark.parametrize("name, args, names", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_key(tmp_path, monkeypatch, capsys, name, args, names):
    monkeypatch.chdir(tmp_path)
    if isinstance(args, str):
        (tmp_path / "exp.yaml").write_text(args)
        args = ["--config", str(tmp_path / "exp.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(part in err for part in names), err[-800:]
    assert "Traceback" not in err


@pytest.mark.parametrize("problem", ["other_backbone", "nan_weights", "works"])
def test_editor_checkpoint_through_the_cli(tmp_path, monkeypatch, capsys, image_root, problem):
    monkeypatch.chdir(tmp_path)
    spec = TinySpec(hidden_size=48, num_layers=3) if problem == "other_backbone" else TinySpec()
    ckpt = _shift_checkpoint(
        tmp_path / "shift.safetensors",
        LlavaVLM(tiny=spec),
        bad=float("nan") if problem == "nan_weights" else None,
    )
    args = [
        "--model.editor.class_path",
        f"{__name__}.ShiftEditor",
        "--model.editor.init_args.checkpoint",
        str(ckpt),
        *FAST[2:],
        *_data_args(SAMPLE / "mmedit" / "vqa_eval.json", image_root, "error"),
        "--data.limit",
        "2",
    ]
    if problem == "works":
        summary = run_cli(tmp_path, *args, config=BASE_CONFIG)
        assert summary["n_cases"] == 2 and summary["editor"]["class"] == "ShiftEditor"
        return
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *args, config=BASE_CONFIG)
    assert exit_info.value.code == 2 and isinstance(exit_info.value.__cause__, EditorCheckpointError)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: editor checkpoint ") and str(ckpt) in message
    if problem == "other_backbone":
        assert "trained for another backbone" in message and '"hidden_size": 48' in message, message
        assert '"hidden_size": 32' in message, message
    else:
        assert "NaN" in message and "tensor 'model.language_model.layers.1.mlp." in message, message
    assert not (tmp_path / "results" / "cases.jsonl").exists()  # refused before any case


def test_unwritable_results_folder_fails_before_any_case(tmp_path, monkeypatch, capsys):
    # Tests run as root, for whom permission bits mean nothing; a regular file in the path fails for
    # everyone.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    results = tmp_path / "afile" / "sub"

    def no_case(*args, **kwargs):
        raise AssertionError("a case was computed before the results folder was checked")

    monkeypatch.setattr("lightning_modules.edit_loop.reference_outputs", no_case)
    monkeypatch.setattr("datamodules.edit_datamodule.load_edit_dataset", no_case)
    with pytest.raises(SystemExit) as exit_info:
        edit.main(["test", "--config", str(FT_CONFIG), *QUIET, "--results_dir", str(results)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: results_dir {str(results)!r} is not writable"), message
    assert isinstance(exit_info.value.__cause__, OSError)


# --- interrupted runs and determinism ----------------------------------------------------------------

#: The runs compared below: FT (3 steps) on the first 6 sample cases, written one by one, generation on.
RUN_ARGS = [
    *_data_args(SAMPLE / "mmedit" / "vqa_eval.json", SAMPLE / "images", "error"),
    "--model.editor.init_args.steps",
    "3",
    "--data.limit",
    "6",
    "--data.batch_size",
    "1",
]
#: Summary fields that legitimately differ between runs of the same experiment.
RUN_LOCAL = (
    "edit_seconds_per_case_rank0",
    "n_resumed_rank0",
    "generated_rows_rank0",
    "config",
    "world_size",
)


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def cases(self) -> bytes:
        return (self.dir / "results" / "cases.jsonl").read_bytes()

    def comparable(self) -> dict[str, Any]:
        return {k: v for k, v in self.summary.items() if k not in RUN_LOCAL}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Run:
    """One uninterrupted in-process run that the interrupted, repeated and DDP runs must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        return Run(workdir, run_cli(workdir, *RUN_ARGS))
    finally:
        os.chdir(cwd)


def _command(results: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "edit.py"),
        "test",
        "--config",
        str(FT_CONFIG),
        *QUIET,
        *RUN_ARGS,
        "--results_dir",
        str(results),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path, reference_run):
    results = tmp_path / "results"
    cases = results / "cases.jsonl"
    command = _command(results)
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the run we wait on
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while _complete_lines(cases) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be killed: " + log.read_text()[-2000:]
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    written = _complete_lines(cases)
    assert 3 <= written < 6, f"killed with {written} cases written; expected mid-run"
    assert not (results / "summary.json").exists()

    rerun = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = Run(tmp_path, json.loads((results / "summary.json").read_text()))
    assert resumed.summary["n_resumed_rank0"] >= 3  # the killed run's cases were kept, not recomputed
    ids = [json.loads(line)["case_id"] for line in resumed.cases.splitlines()]
    assert ids == [f"vqa_eval:{i}" for i in range(6)]  # none missing, none doubled, dataset order
    assert resumed.comparable() == reference_run.comparable()
    assert resumed.cases == reference_run.cases


def test_same_seed_gives_byte_identical_cases(tmp_path, monkeypatch, reference_run):
    monkeypatch.chdir(tmp_path)
    again = Run(tmp_path, run_cli(tmp_path, *RUN_ARGS))
    assert again.cases == reference_run.cases
    assert again.comparable() == reference_run.comparable()
    lines = [json.loads(line) for line in again.cases.splitlines()]
    assert len(lines) == 6 and all("rel" in line["scores"] for line in lines)


def test_two_ddp_processes_give_the_same_per_case_values(tmp_path, reference_run):
    results = tmp_path / "results"
    command = _command(results, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Run(tmp_path, json.loads((results / "summary.json").read_text()))
    assert two.summary["world_size"] == 2
    one_cases = [json.loads(line) for line in reference_run.cases.splitlines()]
    two_cases = [json.loads(line) for line in two.cases.splitlines()]
    assert [c["case_id"] for c in two_cases] == [c["case_id"] for c in one_cases]
    for a, b in zip(one_cases, two_cases, strict=True):
        assert a["scores"] == b["scores"], a["case_id"]
        assert a["predictions"] == b["predictions"], a["case_id"]
    assert two.cases == reference_run.cases
    assert two.comparable() == reference_run.comparable()


def test_image_root_that_is_not_a_folder_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    annotation = ROOT / "data" / "sample" / "mmedit" / "vqa_eval.json"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *FAST, "--data.annotation_file", str(annotation), "--data.image_root", "nowhere")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'nowhere' is not a directory" in err and "vqa_eval.json" in err and "Traceback" not in err
