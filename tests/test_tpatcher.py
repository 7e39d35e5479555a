"""Added key-value neurons (editors/added_neurons.py) and T-Patcher (editors/tpatcher.py).

The neurons live in hooks, never in a backbone weight: with no neuron, or once removed, every
family computes exactly what it computed before; T-Patcher's edits take, its neurons stay off
inputs it never saw, and restore is bit for bit after one edit and after a sequence.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import changed, make_case, solid_image, state_copy
from tiny_families import FAMILIES

from core.case import EditCase, Probe
from editors.added_neurons import NeuronPatch, PatchHandle, attach_patches, capture_ffn_inputs, ffn_width
from editors.tpatcher import TPatcher

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
THINGS = ["tower", "bridge", "statue", "temple", "castle", "harbour", "market", "garden"]


def unrelated_case(i: int) -> EditCase:
    """A training-like record about thing i (each index its own picture, question and answers)."""
    img = solid_image(COLOURS[i % len(COLOURS)], (32 + 4 * i, 36))
    edit = Probe(f"Which city holds this {THINGS[i]}?", f"City{i}", img, kind="rel")
    probes = {
        "rel": [edit],
        "t_gen": [Probe(f"Name the city of this {THINGS[i]}.", f"City{i}", img, kind="t_gen")],
        "t_loc": [Probe(f"What is {i} plus {i}?", str(2 * i), None, kind="t_loc")],
        "i_loc": [
            Probe("What shape is this?", "square", solid_image(COLOURS[-1 - i % 6], (30, 30)), kind="i_loc")
        ],
    }
    return EditCase(case_id=f"memory-{i}", index=i, edit=edit, probes=probes, source="memory")


def probes_of(case: EditCase) -> list[Probe]:
    return [case.edit, *case.all_probes()]


def hooks(vlm) -> int:
    """How many forward hooks the model's modules hold (some families register their own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    vlm = FAMILIES[request.param]()
    vlm.requires_grad_(False)
    vlm.model.eval()
    return request.param, vlm


@pytest.fixture(scope="module")
def llava():
    vlm = FAMILIES["llava"]()
    vlm.requires_grad_(False)
    vlm.model.eval()
    return vlm


def random_patch(vlm, n: int, seed: int, dtype: torch.dtype = torch.float32) -> NeuronPatch:
    patch = NeuronPatch(ffn_width(vlm), n, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in patch.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(dtype))
    return patch


def fast_tpatcher(**kwargs) -> TPatcher:
    settings = {"lr": 0.1, "steps": 8, "memory_weight": 1.0}
    return TPatcher.from_cases([unrelated_case(i) for i in range(4)], **{**settings, **kwargs})


# ----------------------------------------------------------------- added neurons, every family
@torch.no_grad()
def test_patches_are_exact_no_ops_when_empty_or_removed(family):
    name, vlm = family
    batch = vlm.build_batch(probes_of(make_case(0)))
    reference = vlm.logits(batch)
    own_hooks = hooks(vlm)
    for patches in ({}, {0: [NeuronPatch(ffn_width(vlm), 0)], -1: [NeuronPatch(ffn_width(vlm), 0)] * 2}):
        handle = attach_patches(vlm, patches)
        assert torch.equal(vlm.logits(batch), reference), (name, patches)
        handle.remove()
    # A fresh patch (all zeros) adds nothing either; a real one changes the output; removing restores.
    handle = attach_patches(vlm, {-1: [NeuronPatch(ffn_width(vlm), 3)]})
    assert torch.equal(vlm.logits(batch), reference), name
    handle.add(0, random_patch(vlm, 2, seed=1))
    assert not torch.allclose(vlm.logits(batch), reference), name
    handle.remove()
    assert torch.equal(vlm.logits(batch), reference), name
    assert hooks(vlm) == own_hooks, name


@torch.no_grad()
def test_patch_adds_its_increment_to_the_ffn_output(family):
    # On OPT the ports are fc1 (input) and fc2 (output) and the rows come flattened; Llama-style
    # layers hook the mlp for both. Either way: output' = output + act(q K + b) (V + shift).
    name, vlm = family
    batch = vlm.build_batch(probes_of(make_case(1)))
    layer = vlm.num_language_layers - 1
    port = vlm.ffn_ports(layer).output_module
    outputs: list[torch.Tensor] = []
    with capture_ffn_inputs(vlm, [layer]) as q:
        probe = port.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        vlm.logits(batch)
        first, patch = random_patch(vlm, 2, seed=2), random_patch(vlm, 3, seed=3)
        patch.value_shift = torch.randn(ffn_width(vlm), generator=torch.Generator().manual_seed(4))
        handle = attach_patches(vlm, {layer: [first]})
        handle.add(-1, patch)
        probe.remove()  # re-registered after the patch hooks, so it sees the patched output
        probe = port.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        with handle.recording() as recorded:
            vlm.logits(batch)
        probe.remove()
        handle.remove()
    plain, patched = outputs
    expected = plain + first(q[layer]).to(plain.dtype) + patch(q[layer]).to(plain.dtype)
    torch.testing.assert_close(patched, expected)
    scores = recorded[layer]
    assert len(scores) == 2 and scores[1].shape[-1] == 3
    torch.testing.assert_close(scores[1], patch.scores(q[layer]))
    values = patch.values + patch.value_shift
    torch.testing.assert_close(patch(q[layer]), torch.relu(q[layer] @ patch.keys + patch.key_bias) @ values)


@torch.no_grad()
def test_patch_computes_in_its_own_dtype_and_casts_back():
    vlm = FAMILIES["llava"]()
    vlm.model.to(torch.bfloat16)
    batch = vlm.build_batch(probes_of(make_case(2)))
    patch = random_patch(vlm, 2, seed=5, dtype=torch.float32)
    handle = attach_patches(vlm, {-1: [patch]})
    with handle.recording() as recorded:
        logits = vlm.logits(batch)
    handle.remove()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert recorded[vlm.num_language_layers - 1][0].dtype == torch.float32
    assert patch(torch.zeros(4, ffn_width(vlm), dtype=torch.bfloat16)).dtype == torch.float32


def test_recording_keeps_nothing_when_not_asked(llava):
    handle = attach_patches(llava, {-1: [random_patch(llava, 1, seed=6)]})
    with torch.no_grad():
        llava.logits(llava.build_batch([make_case(0).edit]))
    assert handle._recorded is None and not handle._queries
    handle.remove()
    with pytest.raises(RuntimeError, match="after remove"):
        handle.add(-1, random_patch(llava, 1, seed=6))


def test_bad_patches_are_refused(llava):
    with pytest.raises(ValueError, match="activation"):
        NeuronPatch(8, 1, activation="tanh")
    with pytest.raises(ValueError, match="n_neurons"):
        NeuronPatch(8, -1)
    with pytest.raises(ValueError, match="hidden_size 7"):
        attach_patches(llava, {-1: [NeuronPatch(7, 1)]})
    with pytest.raises(ValueError, match="layers"):
        PatchHandle(llava).add(llava.num_language_layers, NeuronPatch(ffn_width(llava), 1))


# ----------------------------------------------------------------- T-Patcher
def test_tpatcher_edits_restore_bit_for_bit_on_every_family(family):
    # Warnings as errors: the replay of the patched layer must reproduce the full forward's loss.
    name, vlm = family
    before = state_copy(vlm)
    own_hooks = hooks(vlm)
    flags = {n: p.requires_grad for n, p in vlm.model.named_parameters()}
    editor = fast_tpatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cases in ([make_case(0)], [make_case(i) for i in range(3)]):
            handle = editor.apply(vlm, cases)
            assert handle.stats["neurons"] == len(cases)
            assert all(c["steps"] == 8 for c in handle.stats["cases"])
            # Only the patched (last) layer and the final modules ran per step.
            assert all(c["replayed_from_layer"] == vlm.num_language_layers - 1 for c in handle.stats["cases"])
            vlm.teacher_forced([p for c in cases for p in c.all_probes()])
            assert not changed(vlm, before), name  # neurons live in hooks, never in weights
            handle.restore()
            assert not changed(vlm, before), name
            assert {n: p.requires_grad for n, p in vlm.model.named_parameters()} == flags
            assert all(p.grad is None for p in vlm.model.parameters())
    batch = vlm.build_batch(probes_of(make_case(0)))
    assert hooks(vlm) == own_hooks
    with torch.no_grad():
        reference = vlm.logits(batch)
        handle = editor.apply(vlm, [make_case(0)])
        handle.restore()
        assert torch.equal(vlm.logits(batch), reference)


def test_sequence_keeps_earlier_neurons_and_grows_the_memory(llava):
    editor = fast_tpatcher()
    cases = [make_case(i) for i in range(3)]
    handle = editor.apply(llava, cases)
    patches = handle.patches.all_patches()
    assert len(patches) == 3 and not any(p.requires_grad for patch in patches for p in patch.parameters())
    entries = [c["memory_entries"][llava.num_language_layers - 1] for c in handle.stats["cases"]]
    assert entries[0] < entries[1] < entries[2]  # each edited input joins the memory of later edits
    handle.restore()


class ShiftedTPatcher(TPatcher):
    """New neurons whose values start shifted (as UniKE's): the patch is no no-op from the start."""

    def new_patch(self, vlm, layer, queries):
        patch = super().new_patch(vlm, layer, queries)
        patch.value_shift = torch.full((ffn_width(vlm),), 0.5)
        return patch


def test_patches_that_start_shifted_still_replay_and_facts_get_their_own_neurons(llava):
    case = make_case(5)
    case.extra_edits = [Probe("Which river runs past this landmark?", "Tiber", case.edit.image, kind="rel")]
    editor = ShiftedTPatcher.from_cases([unrelated_case(i) for i in range(4)], lr=0.1, steps=3)
    before = state_copy(llava)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replay's first-call check must hold
        handle = editor.apply(llava, [case])
    (patch,) = handle.patches.all_patches()
    assert patch.n_neurons == 2 and patch.value_shift is not None  # one neuron per written fact
    assert handle.stats["cases"][0]["replayed_from_layer"] == llava.num_language_layers - 1
    handle.restore()
    assert not changed(llava, before)


def test_tpatcher_on_a_bf16_backbone_trains_float32_neurons():
    vlm = FAMILIES["llava"]()
    vlm.requires_grad_(False)
    vlm.model.to(torch.bfloat16)
    before = state_copy(vlm)
    editor = fast_tpatcher(steps=3)
    handle = editor.apply(vlm, [make_case(0)])
    assert editor.memory[vlm.num_language_layers - 1].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in handle.patches.all_patches()[0].parameters())
    assert all(math.isfinite(c["final_loss"]) for c in handle.stats["cases"])
    handle.restore()
    assert not changed(vlm, before)


def test_tpatcher_raises_the_targets_probability(llava):
    # A random tiny model's final norm and small lm_head bound how far any last-layer change can
    # move a probability (about 1/vocab here), so the test asks for the argmax and a clear rise.
    case = make_case(3)
    edit = case.edit
    first_token = llava.encode_answer(edit.answer)[0]

    def at_anchor() -> tuple[float, bool]:
        batch = llava.build_batch([edit])
        start = batch.answer_spans[0][0]
        probs = llava.logits(batch)[0, start - 1].softmax(-1)
        return probs[first_token].item(), probs.argmax().item() == first_token

    with torch.no_grad():
        (p_before, top_before), nll_before = at_anchor(), llava.loss([edit]).item()
    handle = fast_tpatcher(steps=20).apply(llava, [case])
    with torch.no_grad():
        (p_after, top_after), nll_after = at_anchor(), llava.loss([edit]).item()
    stats = handle.stats["cases"][0]
    handle.restore()
    assert not top_before and top_after
    assert p_after > 1.5 * p_before, (p_before, p_after)
    assert nll_after < nll_before
    assert stats["final_edit_nll"] == pytest.approx(nll_after, rel=1e-4)
    assert stats["edit_score"] > 0 and stats["time_s"] > 0


def test_new_neurons_stay_off_held_out_unrelated_inputs(llava):
    # The memory holds six records; two more, never shown to the editor, are the held-out inputs.
    memory = [unrelated_case(i) for i in range(6)]
    held_out = [p for i in (6, 7) for p in probes_of(unrelated_case(i))]
    layer = llava.num_language_layers - 1

    def scores_after(steps: int) -> tuple[torch.Tensor, dict]:
        editor = TPatcher.from_cases(memory, lr=0.1, steps=steps, memory_weight=10.0)
        handle = editor.apply(llava, [make_case(4)])
        with torch.no_grad():
            remembered = editor.memory[layer]
            unseen = editor._text_queries(llava, held_out, [layer])[layer]
            # The prompts share their template's opening with the memory's (a causal model gives
            # those positions equal inputs): only positions unlike every memory entry count.
            unseen = unseen[torch.cdist(unseen, remembered).min(1).values > 1e-3]
            scores = handle.patches.all_patches()[0].scores(unseen).flatten()
        stats = handle.stats["cases"][0]
        handle.restore()
        assert len(unseen) >= 100
        return scores, stats

    initial, _ = scores_after(0)
    trained, stats = scores_after(30)
    # T-Patcher's initial key (the edit's own query) fires on much of everything; trained on the
    # memory, the neuron is off (ReLU score < 0) on nearly all unseen inputs and typically below
    # beta. A random tiny model's features leave a few positions close to the edit's, so this
    # asks for 95%, not all (on the world backbone, I-Loc stays at 98.5).
    assert (initial < 0).float().mean() < 0.75
    assert (trained < 0).float().mean() >= 0.95
    assert trained.median() < -3.0  # the memory margin beta
    assert stats["edit_score"] > 0  # and it still fires on the edit


def test_tpatcher_works_inside_inference_mode(llava):
    before = state_copy(llava)
    editor = fast_tpatcher(steps=2)
    with torch.inference_mode():
        editor.setup(llava)  # Lightning calls setup and apply under inference mode
        handle = editor.apply(llava, [make_case(0)])
        assert handle.stats["steps"] == 2
        handle.restore()
    assert not changed(llava, before)


def test_failed_edit_leaves_no_hook(llava):
    editor = fast_tpatcher()
    own_hooks = hooks(llava)
    bad = make_case(0)
    bad.edit = Probe("x" * 100_000, "y", None)
    with pytest.raises(ValueError):
        editor.apply(llava, [make_case(1), bad])
    assert hooks(llava) == own_hooks


def test_memory_from_a_training_file_and_size_cap(llava):
    editor = TPatcher(
        memory_file=str(SAMPLE / "mmedit" / "vqa_train.json"),
        image_root=str(SAMPLE / "images"),
        max_records=3,
        memory_size=50,
        layers=[0, -1],
    )
    editor.setup(llava)
    assert set(editor.memory) == {0, llava.num_language_layers - 1}
    assert all(m.shape == (50, ffn_width(llava)) and m.dtype == torch.float32 for m in editor.memory.values())
    handle = editor.apply(llava, [make_case(0)])
    assert len(handle.patches.all_patches()) == 2  # one patch per layer
    handle.restore()


def test_describe_records_every_setting():
    editor = TPatcher(
        memory_file="train.json",
        layers=[-2, -1],
        n_neurons=2,
        activation="gelu",
        lr=0.05,
        steps=7,
        activation_weight=2.0,
        memory_weight=3.0,
        memory_margin=-1.0,
        gap_margin=2.0,
        memory_size=123,
        name="tp",
    )
    described = editor.describe()
    expected = {
        "name": "tp",
        "class": "TPatcher",
        "memory_file": "train.json",
        "layers": [-2, -1],
        "n_neurons": 2,
        "activation": "gelu",
        "lr": 0.05,
        "steps": 7,
        "activation_weight": 2.0,
        "memory_weight": 3.0,
        "memory_margin": -1.0,
        "gap_margin": 2.0,
        "memory_size": 123,
        "activation_top_k": 5,
        "memory_top_k": 1000,
        "update_memory": True,
        "patch_dtype": "float32",
    }
    assert {k: described[k] for k in expected} == expected
    assert not TPatcher.side_by_side


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_neurons": 0}, "n_neurons"),
        ({"lr": 0.0}, "lr"),
        ({"steps": -1}, "steps"),
        ({"layers": []}, "layers is empty"),
        ({"layers": [-1, -1]}, "twice"),
        ({"activation": "tanh"}, "activation"),
        ({"memory_margin": 1.0}, "memory_margin"),
        ({"gap_margin": -1.0}, "gap_margin"),
        ({"memory_weight": -1.0}, "memory_weight"),
        ({"memory_top_k": 0}, "top_k"),
        ({"memory_size": 0}, "memory_size"),
        ({"patch_dtype": "float16"}, "patch_dtype"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TPatcher(memory_file="train.json", **kwargs)


def test_bad_layers_and_missing_memory_are_refused_at_setup(llava):
    with pytest.raises(ValueError, match="does not exist"):
        TPatcher.from_cases([unrelated_case(0)], layers=[llava.num_language_layers]).setup(llava)
    with pytest.raises(ValueError, match="same layer twice"):
        TPatcher.from_cases([unrelated_case(0)], layers=[-1, llava.num_language_layers - 1]).setup(llava)
    with pytest.raises(ValueError, match="memory_file"):
        TPatcher().setup(llava)
    with pytest.raises(ValueError, match="no records"):
        TPatcher.from_cases([]).setup(llava)


@pytest.mark.parametrize("mode", ["one_step", "sequential"])
def test_runs_through_the_edit_loop(tmp_path, mode):
    from datamodules.edit_datamodule import EditDataModule
    from lightning_modules.edit_cli import edit_trainer
    from lightning_modules.edit_eval import EditEval

    vlm = FAMILIES["llava"]()
    before = state_copy(vlm)
    editor = TPatcher(
        memory_file=str(SAMPLE / "mmedit" / "vqa_train.json"),
        image_root=str(SAMPLE / "images"),
        max_records=4,
        lr=0.1,
        steps=4,
    )
    images = str(SAMPLE / "images")
    data = EditDataModule(str(SAMPLE / "mmedit" / "vqa_eval.json"), images, limit=3, batch_size=3)
    module = EditEval(vlm, editor, mode=mode)
    edit_trainer(results_dir=str(tmp_path)).test(module, datamodule=data, verbose=False)
    scores = module.scores.compute()
    assert all(0.0 <= scores[k] <= 100.0 for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc"))
    assert not changed(vlm, before)
    assert (tmp_path / "summary.json").exists()
