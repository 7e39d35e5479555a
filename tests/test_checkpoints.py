"""Safe loading: editor checkpoints (safetensors + backbone fingerprint), torch.load, pickle, remote code."""

from __future__ import annotations

import ast
import inspect
import json
import math
import pkgutil
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import backbones
from backbones import LlavaVLM, TinySpec
from backbones.base import VLM
from editors.checkpoint import (
    META_KEY,
    EditorCheckpointError,
    load_editor_checkpoint,
    save_editor_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
#: The project's own packages (not tests, not the virtualenv): where loading code may live.
PROJECT_DIRS = [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
TARGETS = ("ffn:-1",)


@pytest.fixture(scope="module")
def vlm() -> LlavaVLM:
    return LlavaVLM(tiny=TinySpec())


def _deltas(vlm: VLM, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(p.shape, generator=gen) * scale for name, p in vlm.parameter_group(*TARGETS).items()
    }


def test_fingerprint_describes_the_backbone(vlm):
    fp = vlm.fingerprint(*TARGETS)
    assert fp["model_class"] == "LlavaForConditionalGeneration"
    assert (fp["hidden_size"], fp["num_layers"]) == (32, 2)
    assert fp["vocab_size"] == vlm.model.get_input_embeddings().weight.shape[0]
    assert fp["parameters"] and all(".layers.1.mlp." in name for name in fp["parameters"])
    assert vlm.fingerprint()["parameters"] == {}  # no groups: only the model's shape
    other = LlavaVLM(tiny=TinySpec(hidden_size=48, num_layers=3)).fingerprint(*TARGETS)
    assert other != fp and other["hidden_size"] == 48


def test_round_trip_keeps_tensors_and_meta(tmp_path, vlm):
    state = _deltas(vlm)
    meta = {"editor": "MEND", "backbone": vlm.fingerprint(*TARGETS), "train": {"steps": 3}}
    path = save_editor_checkpoint(tmp_path / "ckpt" / "mend.safetensors", state, meta)
    loaded, loaded_meta = load_editor_checkpoint(path, vlm.fingerprint(*TARGETS), editor="MEND")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert loaded_meta["train"] == {"steps": 3} and loaded_meta["backbone"] == meta["backbone"]
    with pytest.raises(EditorCheckpointError, match="saved by editor 'MEND', not 'SERAC'"):
        load_editor_checkpoint(path, vlm.fingerprint(*TARGETS), editor="SERAC")


def test_checkpoint_for_another_backbone_names_both(tmp_path, vlm):
    other = LlavaVLM(tiny=TinySpec(hidden_size=48, num_layers=3))
    path = save_editor_checkpoint(
        tmp_path / "other.safetensors",
        _deltas(other),
        {"editor": "MEND", "backbone": other.fingerprint(*TARGETS)},
    )
    with pytest.raises(EditorCheckpointError) as err:
        load_editor_checkpoint(path, vlm.fingerprint(*TARGETS))
    msg = str(err.value)
    assert str(path) in msg and "trained for another backbone" in msg
    assert "hidden_size" in msg and "num_layers" in msg
    assert '"hidden_size": 48' in msg and '"hidden_size": 32' in msg  # both fingerprints, side by side


def test_same_sizes_but_other_attachment_point_is_refused(tmp_path, vlm):
    # Same model, but the editor was trained on layer 0's FFN: the parameter names differ.
    path = save_editor_checkpoint(
        tmp_path / "layer0.safetensors",
        {"w": torch.zeros(2)},
        {"editor": "MEND", "backbone": vlm.fingerprint("ffn:0")},
    )
    with pytest.raises(EditorCheckpointError, match=r"parameter .*layers\.0\.mlp"):
        load_editor_checkpoint(path, vlm.fingerprint(*TARGETS))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, vlm, bad):
    state = _deltas(vlm)
    name = sorted(state)[-1]
    state[name].view(-1)[3] = bad
    meta = {"editor": "MEND", "backbone": vlm.fingerprint(*TARGETS)}
    with pytest.raises(EditorCheckpointError, match=f"tensor '{name}'"):
        save_editor_checkpoint(tmp_path / "never.safetensors", state, meta)
    assert not (tmp_path / "never.safetensors").exists()
    # A file written by something else (or edited on disk) is checked on load as well.
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(EditorCheckpointError) as err:
        load_editor_checkpoint(path, vlm.fingerprint(*TARGETS))
    kind = "1 NaN" if math.isnan(bad) else "0 NaN and 1 Inf"
    assert f"tensor {name!r}" in str(err.value) and kind in str(err.value) and str(path) in str(err.value)


def test_pickles_and_foreign_files_are_not_loaded(tmp_path, vlm):
    fp = vlm.fingerprint(*TARGETS)
    pickled = tmp_path / "editor.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(EditorCheckpointError, match="not a readable safetensors file"):
        load_editor_checkpoint(pickled, fp)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(EditorCheckpointError, match="no 'mmke_editor_meta' metadata"):
        load_editor_checkpoint(bare, fp)
    with pytest.raises(EditorCheckpointError, match="does not exist"):
        load_editor_checkpoint(tmp_path / "missing.safetensors", fp)


# --- static checks over the project's sources ---------------------------------------------------------


def _project_sources() -> list[Path]:
    return sorted(p for d in PROJECT_DIRS for p in d.rglob("*.py")) + sorted(ROOT.glob("*.py"))


def _calls(tree: ast.AST, attr: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
    ]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


UNPICKLERS = ("pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal")


def _unsafe_loads(label: str, source: str) -> list[str]:
    """Every way `source` could unpickle: torch.load without weights_only=True, pickle-family imports
    and loads, pandas read_pickle, numpy allow_pickle."""
    tree = ast.parse(source)
    found = []
    for call in _calls(tree, "load"):
        owner = call.func.value
        if isinstance(owner, ast.Name) and owner.id == "torch":
            value = _keyword(call, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{label}:{call.lineno} torch.load without weights_only=True")
    found += [f"{label}:{c.lineno} read_pickle" for c in _calls(tree, "read_pickle")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _keyword(node, "allow_pickle") is not None:
            value = _keyword(node, "allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{label}:{node.lineno} allow_pickle")
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [f"{label}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
    return found


def test_torch_load_is_weights_only_and_nothing_unpickles():
    sources = _project_sources()
    assert len(sources) > 20
    offenders = [o for path in sources for o in _unsafe_loads(str(path.relative_to(ROOT)), path.read_text())]
    assert not offenders, offenders


def test_unsafe_load_detector_finds_each_offence():
    source = (
        "import pickle\nimport torch, numpy as np, pandas as pd\n"
        "a = torch.load('a')\nb = torch.load('b', weights_only=False)\nc = torch.load('c', weights_only=True)\n"
        "d = np.load('d.npy', allow_pickle=True)\ne = np.load('e.npy', allow_pickle=False)\n"
        "f = pd.read_pickle('f')\n"
    )
    assert sorted(_unsafe_loads("x.py", source)) == [
        "x.py:1 imports pickle",
        "x.py:3 torch.load without weights_only=True",
        "x.py:4 torch.load without weights_only=True",
        "x.py:6 allow_pickle",
        "x.py:8 read_pickle",
    ]


def test_remote_code_is_off_by_default_for_every_adapter():
    for info in pkgutil.iter_modules(backbones.__path__):
        import_module(f"backbones.{info.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    adapters = {
        c for c in subclasses(VLM) if not inspect.isabstract(c) and c.__module__.startswith("backbones.")
    }
    checked = []
    for cls in adapters:
        params = inspect.signature(cls).parameters
        if "pretrained" not in params:
            continue  # builds from sizes only; loads nothing
        assert "trust_remote_code" in params, cls
        assert params["trust_remote_code"].default is False, cls
        checked.append(cls.__name__)
    assert {"LlavaVLM", "Blip2OptVLM", "MiniGPT4VLM", "Qwen2VLVLM", "ImageTextToTextVLM"} <= set(checked)


def test_every_auto_class_load_forwards_trust_remote_code():
    # Auto* classes and model classes may execute a repository's code; concrete image processors
    # cannot, so they are not asked to forward the flag.
    found = 0
    for path in _project_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, "from_pretrained"):
            owner = call.func.value
            name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
            if "ImageProcessor" in name:
                continue
            found += 1
            value = _keyword(call, "trust_remote_code")
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}.from_pretrained"
            assert value is not None, f"{where} does not pass trust_remote_code"
            assert isinstance(value, ast.Name) and value.id == "trust_remote_code", where
    assert found >= 8
