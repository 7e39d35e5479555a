"""UniKE (`editors/unike.py`) on a small world LLaVA: the knowledge mined by `knowledge.mine`, encoders saved
by `save_encoders`, the memory of unrelated inputs from the tiny world's training split.

The backbone is randomly initialised, so the numbers mean nothing; what is checked is the mechanism:
identity at alpha = 1 / beta = 0 / no neurons, restores bit for bit (one-step and sequential, through
the real loop), zeta's value shift, the ablations' settings, and refusals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from core.case import Probe
from datamodules.dataset import load_edit_dataset
from datamodules.edit_datamodule import EditDataModule
from editors.added_neurons import NeuronPatch
from editors.unike import UniKE
from editors.unike_encoders import KnowledgeEncoders, save_encoders
from knowledge.mine import run as mine_run
from knowledge.sources import WithheldSource
from knowledge.store import backbone_key
from lightning_modules.edit_cli import edit_trainer
from lightning_modules.edit_eval import EditEval
from world.backbones import WorldLlavaVLM, WorldSpec
from world.build import build_world
from world.config import load_world_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"hidden_size": 32, "num_layers": 3, "vision_hidden_size": 32, "vision_layers": 1, "num_heads": 2}
LAYERS = [-2, -1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    """A tiny world, its backbone, mined knowledge at LAYERS and saved (untrained) encoders."""
    root = tmp_path_factory.mktemp("unike")
    world = root / "world"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), world, verbose=False)
    vlm = WorldLlavaVLM(world_dir=str(world), spec=WorldSpec(**SPEC))
    vlm.requires_grad_(False)
    knowledge = root / "knowledge"
    mine_run(
        vlm, str(knowledge), withheld=WithheldSource(str(world), renderings=3), layers=LAYERS, progress=False
    )
    torch.manual_seed(0)
    encoders = KnowledgeEncoders(
        SPEC["hidden_size"], LAYERS, truth_dim=8, width=16, num_layers=SPEC["num_layers"]
    )
    encoders_path = save_encoders(root / "encoders.safetensors", encoders, backbone_key(vlm))
    return {"world": world, "vlm": vlm, "knowledge": str(knowledge), "encoders": str(encoders_path)}


def make(setting: dict, **kwargs) -> UniKE:
    world = setting["world"]
    options = {
        "knowledge": setting["knowledge"],
        "encoders": setting["encoders"],
        "layers": LAYERS,
        "n_neurons": 2,
        "steps": 3,
        "lr": 0.05,
        "top_k": 4,
        "memory_file": str(world / "mmedit" / "vqa_train.json"),
        "image_root": str(world / "images"),
        "format": "mmedit_vqa",
        "prompt_template": "{}",
        "loc_image_template": "{}",
        "max_records": 4,
        **kwargs,
    }
    return UniKE(**options)


def eval_cases(setting: dict, n: int = 3):
    world = setting["world"]
    data = load_edit_dataset(
        str(world / "mmedit" / "vqa_eval.json"),
        str(world / "images"),
        format="mmedit_vqa",
        prompt_template="{}",
    )
    return [data[i] for i in range(n)]


def logits(vlm, probes: list[Probe]) -> torch.Tensor:
    with torch.no_grad():
        return vlm.logits(vlm.build_batch(probes))


def test_alpha_one_beta_zero_and_no_neurons_leave_outputs_bit_identical(setting):
    vlm = setting["vlm"]
    cases = eval_cases(setting)
    probes = [p for case in cases for p in case.all_probes()]
    before = logits(vlm, probes)
    editor = make(setting, intrinsic=False, alpha=1.0, beta=0.0, zeta="none")
    handle = editor.apply(vlm, cases[:1])
    assert handle.stats["memory_entries"] > 0  # the edit's own states joined the mined ones
    assert torch.equal(logits(vlm, probes), before)
    handle.restore()
    assert torch.equal(logits(vlm, probes), before)


def test_the_shift_and_the_neurons_change_outputs_and_restore_bit_for_bit(setting):
    vlm = setting["vlm"]
    cases = eval_cases(setting)
    probes = [p for case in cases for p in case.all_probes()]
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    before = logits(vlm, probes)
    for kwargs in ({"intrinsic": False, "alpha": 0.5, "zeta": "none"}, {}):
        editor = make(setting, **kwargs)
        handle = editor.apply(vlm, cases)  # a sequence of three edits
        assert not torch.equal(logits(vlm, probes), before), kwargs
        handle.restore()
        assert torch.equal(logits(vlm, probes), before), kwargs
    assert all(torch.equal(v, state[k]) for k, v in vlm.model.state_dict().items())


def test_values_are_shifted_by_beta_times_zeta(setting):
    vlm = setting["vlm"]
    case = eval_cases(setting, 1)
    shifts = {}
    for zeta in ("truthful", "semantic", "random"):
        editor = make(setting, beta=0.5, zeta=zeta, alpha=0.5)
        handle = editor.apply(vlm, case)
        patches: list[NeuronPatch] = handle.patches.patches.all_patches()
        assert len(patches) == len(LAYERS)
        for patch in patches:
            assert patch.value_shift is not None and patch.value_shift.shape == (SPEC["hidden_size"],)
        shifts[zeta] = [p.value_shift.clone() for p in patches]
        handle.restore()
    encoders = make(setting, beta=0.5)
    encoders.setup(vlm)
    truthful = 0.5 * encoders._encoders.zeta(LAYERS[-1], encoders._states)
    assert torch.allclose(shifts["truthful"][-1], truthful.to(shifts["truthful"][-1].dtype))
    # A random zeta has the truthful one's length, not its direction.
    assert torch.allclose(shifts["random"][-1].norm(), shifts["truthful"][-1].norm(), rtol=1e-4)
    assert not torch.allclose(shifts["random"][-1], shifts["truthful"][-1])
    none = make(setting, beta=0.5, zeta="none").apply(vlm, case)
    assert all(p.value_shift is None for p in none.patches.patches.all_patches())
    none.restore()


def test_vanilla_ike_ablation_puts_the_fact_in_context(setting):
    vlm = setting["vlm"]
    case = eval_cases(setting, 1)
    handle = make(setting, external="vanilla", zeta="none", ike_k=1).apply(vlm, case)
    prepared = handle.prepare(case[0].all_probes())
    assert all(p.context and case[0].edit.answer in p.context[-1].text for p in prepared)
    handle.restore()


@pytest.mark.parametrize(
    "kwargs", [{"edit_in_memory": False}, {"external": "vanilla", "zeta": "none", "ike_k": 1}]
)
def test_extend_edit_by_edit_equals_one_apply(setting, kwargs):
    """Without the edits' own memory entries (which one apply adds before any neuron trains), the same outputs."""
    vlm = setting["vlm"]
    cases = eval_cases(setting)
    probes = [p for case in cases for p in case.all_probes()]
    before = logits(vlm, probes)
    outputs = []
    for incremental in (False, True):
        editor = make(setting, **kwargs)
        if incremental:
            handle = editor.apply(vlm, cases[:1])
            for case in cases[1:]:
                handle = editor.extend(vlm, handle, [case])
        else:
            handle = editor.apply(vlm, cases)
        outputs.append((logits(vlm, handle.prepare(probes)), handle.stats["neurons"]))
        handle.restore()
        assert torch.equal(logits(vlm, probes), before)
    assert torch.equal(outputs[0][0], outputs[1][0]) and outputs[0][1] == outputs[1][1]


def test_extend_adds_each_edits_memory_entries_read_on_the_unedited_model(setting):
    vlm = setting["vlm"]
    cases = eval_cases(setting)
    probes = [p for case in cases for p in case.all_probes()]
    before = logits(vlm, probes)
    # What one apply reads for all three cases on the unedited model.
    one = make(setting)
    one.setup(vlm)
    own = one.edit_states(vlm, cases)
    editor = make(setting)
    handle = editor.apply(vlm, cases[:1])
    sizes = [handle.stats["memory_entries"]]
    for case in cases[1:]:
        handle = editor.extend(vlm, handle, [case])
        sizes.append(handle.stats["memory_entries"])
    assert sizes[1] - sizes[0] == sizes[2] - sizes[1] > 0 and len(handle.tokens) == 3
    # Each extend read its edit's entries with the earlier edits' shift and neurons off.
    layer = editor._latent._layer(LAYERS[-1])
    segments = editor._latent._memory[layer].segments
    keys = torch.cat([segments[t][0] for t in handle.tokens])
    assert torch.allclose(keys, own[LAYERS[-1]]["sem"].to(keys.dtype), atol=1e-6)
    handle.restore()
    assert torch.equal(logits(vlm, probes), before)


@pytest.mark.parametrize("mode", ["one_step", "sequential", "lifelong"])
def test_the_loop_restores_every_tensor(setting, mode, tmp_path):
    vlm, world = setting["vlm"], setting["world"]
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    data = EditDataModule(
        str(world / "mmedit" / "vqa_eval.json"),
        str(world / "images"),
        format="mmedit_vqa",
        prompt_template="{}",
        loc_image_template="{}",
        limit=3,
        batch_size=3,
    )
    module = EditEval(vlm, make(setting), mode=mode)
    edit_trainer(results_dir=str(tmp_path)).test(module, datamodule=data, verbose=False)
    scores = module.scores.compute()
    assert all(0.0 <= scores[k] <= 100.0 for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc"))
    assert all(torch.equal(v, before[k]) for k, v in vlm.model.state_dict().items())


def test_bad_settings_are_refused_in_one_message(setting):
    with pytest.raises(ValueError, match="external"):
        make(setting, external="both")
    with pytest.raises(ValueError, match="alpha"):
        make(setting, alpha=1.5)
    with pytest.raises(ValueError, match="edits nothing"):
        make(setting, intrinsic=False, external="none")
    with pytest.raises(ValueError, match="knowledge"):
        make(setting, knowledge=None)
    with pytest.raises(ValueError, match="encoders"):
        make(setting, encoders=None)
    editor = make(setting, layers=[0])  # the knowledge holds -2 and -1 only (layers 1 and 2 of 3)
    with pytest.raises(ValueError, match="layers"):
        editor.setup(setting["vlm"])


def test_the_configs_name_unike_and_every_ablation_parses():
    base = yaml.safe_load((ROOT / "configs" / "edit" / "unike.yaml").read_text())
    assert base["model"]["editor"]["class_path"] == "editors.unike.UniKE"
    names = sorted(p.stem for p in (ROOT / "configs" / "edit" / "unike_ablations").glob("*.yaml"))
    assert {"only_intrinsic", "only_latent", "intrinsic_ike", "no_collaboration", "zeta_none"} <= set(names)
    for name in names:
        overlay = yaml.safe_load((ROOT / "configs" / "edit" / "unike_ablations" / f"{name}.yaml").read_text())
        settings = {**base["model"]["editor"]["init_args"], **overlay["model"]["editor"]["init_args"]}
        UniKE(**settings)  # every combination is one the editor accepts
