"""UniKE's latent in-context knowledge: a memory read inside self-attention, as a shift of its output."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import make_case
from test_greedy_from_tf import DecodeCounter, own_answers
from test_greedy_from_tf import probes as greedy_probes
from tiny_families import FAMILIES
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from backbones import VLM, LlavaVLM, TinySpec, prefix_cache
from backbones.layer_parts import AttentionParts
from backbones.prefix_cache import plan_chunk, row_logits
from core.case import Probe
from editors.latent_knowledge import LatentKnowledge

pytestmark = pytest.mark.usefixtures("one_thread")


def gqa_llava() -> VLM:
    """A tiny LLaVA whose language model uses grouped-query attention (4 query heads, 2 key/value heads)."""
    vlm = LlavaVLM(tiny=TinySpec(num_heads=4))
    config = vlm.model.config
    config.text_config.num_key_value_heads = 2
    torch.manual_seed(0)
    vlm.model = LlavaForConditionalGeneration(config)
    return vlm


BUILDERS: dict[str, Callable[[], VLM]] = {**FAMILIES, "gqa_llava": gqa_llava}


@pytest.fixture(scope="module")
def built() -> dict[str, VLM]:
    """Each backbone once for the module, frozen (tests that train build their own)."""
    vlms = {name: build() for name, build in BUILDERS.items()}
    for vlm in vlms.values():
        vlm.requires_grad_(False)
    return vlms


def case_probes() -> list[Probe]:
    return [p for kind in make_case(0).probes.values() for p in kind]


def memory(vlm: VLM, layers: tuple[int, ...] = (-2, -1), n: int = 64, seed: int = 0, scale: float = 1.0):
    """Random (keys, values) per layer, values at about the width's norm times `scale`."""
    g = torch.Generator().manual_seed(seed)
    width = vlm.text_config().hidden_size
    keys = {layer: torch.randn(n, width, generator=g) for layer in layers}
    values = {layer: scale * torch.randn(n, width, generator=g) for layer in layers}
    return keys, values


def logits(vlm: VLM, probes: list[Probe]) -> Tensor:
    with torch.inference_mode():
        return vlm.logits(vlm.build_batch(probes))


class Tap:
    """The pre-attention states (input) and attention outputs (after every hook) of one attention module."""

    def __init__(self, parts: AttentionParts) -> None:
        self.h_pre: list[Tensor] = []
        self.out: list[Tensor] = []
        self.handles = [
            parts.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            parts.module.register_forward_hook(self._post),
        ]

    def _pre(self, _m, args, kwargs) -> None:
        self.h_pre.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _post(self, _m, _args, output) -> None:
        self.out.append(output[0] if isinstance(output, tuple) else output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture
def tap() -> Iterator[Callable[[AttentionParts], Tap]]:
    taps: list[Tap] = []

    def make(parts: AttentionParts) -> Tap:
        taps.append(Tap(parts))
        return taps[-1]

    yield make
    for t in taps:
        t.remove()


def hand_attention(parts: AttentionParts, h_pre: Tensor, entries: Tensor) -> Tensor:
    """Attn(h_pre, V, V) with the layer's projections, head by head: (R, H) from (R, H) and (R, K, H)."""
    q, k, v = parts.q_proj(h_pre), parts.k_proj(entries), parts.v_proj(entries)
    d, group = parts.head_dim, parts.num_heads // parts.num_kv_heads
    heads = []
    for i in range(parts.num_heads):
        j = i // group
        qi, kj, vj = q[:, i * d : (i + 1) * d], k[..., j * d : (j + 1) * d], v[..., j * d : (j + 1) * d]
        w = torch.softmax(torch.einsum("rd,rkd->rk", qi, kj) / math.sqrt(d), dim=-1)
        heads.append(torch.einsum("rk,rkd->rd", w, vj))
    return parts.o_proj(torch.cat(heads, dim=-1))


# ----------------------------------------------------------------- alpha = 1, attach / remove
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_alpha_one_is_bit_identical_and_remove_restores(built, name) -> None:
    vlm = built[name]
    probes = case_probes()
    before = logits(vlm, probes)
    keys, values = memory(vlm)
    with LatentKnowledge(vlm, [-2, -1], keys, values, alpha=1.0).attach():
        assert torch.equal(logits(vlm, probes), before)
    shifting = LatentKnowledge(vlm, [-2, -1], keys, values, alpha=0.5, positions="text")
    handle = shifting.attach()
    assert not torch.allclose(logits(vlm, probes), before)  # the hooks do fire
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(logits(vlm, probes), before)


def test_attaching_twice_is_refused(built) -> None:
    vlm = built["llava"]
    keys, values = memory(vlm, layers=(-1,))
    knowledge = LatentKnowledge(vlm, [-1], keys, values)
    with knowledge.attach():
        with pytest.raises(RuntimeError, match="already attached"):
            knowledge.attach()
    knowledge.attach().remove()  # after removal it attaches again


# ----------------------------------------------------------------- retrieval
def test_retrieval_finds_a_planted_key_and_its_scaled_value_dominates(built, tap) -> None:
    vlm = built["llava"]
    parts = vlm.attention_parts(-1)
    seen = tap(parts)
    logits(vlm, case_probes())
    h_pre = seen.h_pre[0][0, 5:6].clone()  # one position's pre-attention state, (1, H)
    keys, values = memory(vlm, layers=(-1,), n=500)
    planted = 123
    keys[-1][planted] = 3.0 * h_pre[0]  # cosine 1 whatever the scale
    # A value whose key projection is the query itself, per head, so every head's score grows with it.
    with torch.no_grad():
        q = parts.q_proj(h_pre)[0]
        u = torch.linalg.lstsq(parts.k_proj.weight, q.unsqueeze(-1)).solution[:, 0]  # no k bias in LLaMA
    # Scaled so that every head's score for it is >= 100 (|q_h|^2 is small in a random tiny model).
    large = 100 * math.sqrt(parts.head_dim) / q.view(parts.num_heads, -1).pow(2).sum(-1).min().item()
    for scale, dominant in ((0.0, False), (large, True)):
        values[-1][planted] = scale * u
        knowledge = LatentKnowledge(vlm, [-1], keys, values, top_k=40)
        with torch.no_grad():
            read = knowledge.read(-1, h_pre)
        assert read.indices[0, 0] == planted  # the most similar entry comes first
        assert torch.equal(read.indices, knowledge.retrieve(-1, h_pre))
        assert read.weights.shape == (1, parts.num_heads, 40)
        torch.testing.assert_close(read.weights.sum(-1), torch.ones(1, parts.num_heads))
        assert bool((read.weights[0, :, 0] > 0.99).all()) == dominant


def test_retrieval_is_top_k_by_cosine_and_chunking_changes_nothing(built) -> None:
    vlm = built["llava"]
    keys, values = memory(vlm, layers=(-1,), n=300)
    keys[-1] *= torch.rand(300, 1) * 10  # key norms must not matter
    knowledge = LatentKnowledge(vlm, [-1], keys, values, top_k=7)
    states = torch.randn(50, vlm.text_config().hidden_size)
    with torch.no_grad():
        whole = knowledge.read(-1, states)
        knowledge.chunk_elements = {"cpu": 1}  # one position per chunk
        chunked = knowledge.read(-1, states)
    cosine = torch.nn.functional.normalize(states, dim=-1) @ torch.nn.functional.normalize(keys[-1], dim=-1).T
    assert torch.equal(whole.indices, cosine.topk(7, dim=-1).indices)
    assert torch.equal(chunked.indices, whole.indices)
    torch.testing.assert_close(chunked.h_know, whole.h_know)


def test_a_memory_smaller_than_top_k_gives_all_its_entries(built) -> None:
    vlm = built["blip2_opt"]
    keys, values = memory(vlm, layers=(-1,), n=3)
    knowledge = LatentKnowledge(vlm, [-1], keys, values, top_k=40, alpha=0.0)
    with torch.no_grad():
        read = knowledge.read(-1, torch.randn(4, vlm.text_config().hidden_size))
    assert read.indices.shape == (4, 3) and sorted(read.indices[0].tolist()) == [0, 1, 2]
    with knowledge.attach():
        assert torch.isfinite(logits(vlm, case_probes())).all()


# ----------------------------------------------------------------- the attention over the memory
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_alpha_zero_with_one_entry_is_the_layers_attention_over_it(built, tap, name) -> None:
    vlm = built[name]
    parts = vlm.attention_parts(-1)
    keys, values = memory(vlm, layers=(-1,), n=1)
    with LatentKnowledge(vlm, [-1], keys, values, alpha=0.0).attach():
        seen = tap(parts)
        logits(vlm, case_probes())
    out = seen.out[0]
    # One entry takes all the attention, whatever the query: every head reads v_proj(V) of its group.
    with torch.no_grad():
        v = parts.v_proj(values[-1]).view(parts.num_kv_heads, 1, parts.head_dim)
        per_head = v.expand(-1, parts.num_heads // parts.num_kv_heads, -1).reshape(1, -1)
        expected = parts.o_proj(per_head)[0]
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_knowledge_is_the_layers_own_attention_over_retrieved_values(built, name) -> None:
    # OPT (biases, q scaling inside its forward), Qwen2 (q/k/v biases) and grouped-query heads.
    vlm = built[name]
    parts = vlm.attention_parts(-1)
    keys, values = memory(vlm, layers=(-1,), n=200, scale=3.0)
    knowledge = LatentKnowledge(vlm, [-1], keys, values, top_k=9)
    states = torch.randn(30, vlm.text_config().hidden_size)
    with torch.no_grad():
        read = knowledge.read(-1, states)
        entries = values[-1][read.indices]
        expected = hand_attention(parts, states, entries)
    assert read.h_know.shape == states.shape
    assert read.weights.shape == (30, parts.num_heads, 9) and read.indices.shape == (30, 9)
    scale = expected.abs().max()
    torch.testing.assert_close(read.h_know / scale, expected / scale, atol=1e-5, rtol=1e-5)
    # The state-space knowledge: the retrieved values mixed by the head-averaged weights.
    torch.testing.assert_close(read.state, torch.einsum("rk,rkh->rh", read.weights.mean(1), entries))


def test_grouped_query_attention_is_read(built) -> None:
    vlm = built["gqa_llava"]
    parts = vlm.attention_parts(-1)
    assert (parts.num_heads, parts.num_kv_heads) == (4, 2)
    keys, values = memory(vlm)
    knowledge = LatentKnowledge(vlm, [-2, -1], keys, values, alpha=0.3, record_alpha=True)
    with knowledge.attach():
        tf = vlm.teacher_forced(case_probes())
    assert len(tf) == len(case_probes())
    assert set(knowledge.last_alpha) == {-2, -1}


# ----------------------------------------------------------------- add / remove
def test_add_and_remove_round_trip(built) -> None:
    vlm = built["llava"]
    probes = case_probes()
    keys, values = memory(vlm, n=32)
    knowledge = LatentKnowledge(vlm, [-2, -1], keys, values, top_k=4, alpha=0.5)
    with knowledge.attach():
        base = logits(vlm, probes)
        # An edit's own states: keys that every position finds first, values that change the output.
        extra_keys, extra_values = memory(vlm, n=2, seed=1, scale=20.0)
        for layer in extra_keys:
            extra_keys[layer][:] = 1.0
        token = knowledge.add(extra_keys, extra_values)
        assert knowledge.size(-1) == 34 and knowledge.size(1) == 34  # either spelling of the layer
        assert not torch.allclose(logits(vlm, probes), base)
        second = knowledge.add(
            {-1: torch.randn(1, keys[-1].shape[1])}, {1: torch.randn(1, keys[-1].shape[1])}
        )
        assert (knowledge.size(-2), knowledge.size(-1)) == (34, 35)
        knowledge.remove(token)
        knowledge.remove(second)
        assert knowledge.size(-1) == 32
        assert torch.equal(logits(vlm, probes), base)
    with pytest.raises(KeyError):
        knowledge.remove(token)
    with pytest.raises(KeyError):
        knowledge.remove(0)  # the initial memory is not an `add`


def test_bad_settings_are_refused(built) -> None:
    vlm = built["llava"]
    keys, values = memory(vlm, layers=(-1,))
    with pytest.raises(ValueError, match="semantic encoder"):
        LatentKnowledge(vlm, [-1], keys, values, alpha="adaptive")
    with pytest.raises(ValueError, match="alpha"):
        LatentKnowledge(vlm, [-1], keys, values, alpha=1.5)
    with pytest.raises(ValueError, match="positions"):
        LatentKnowledge(vlm, [-1], keys, values, positions="image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not hooked"):
        LatentKnowledge(vlm, [-1], {**keys, 0: keys[-1]}, values)
    with pytest.raises(ValueError, match="wide"):
        LatentKnowledge(vlm, [-1], {-1: keys[-1][:, :5]}, {-1: values[-1][:, :5]})
    with pytest.raises(ValueError, match="twice"):
        LatentKnowledge(vlm, [-1, 1], {-1: keys[-1]}, {-1: values[-1]})


# ----------------------------------------------------------------- adaptive alpha
def test_adaptive_alpha_follows_semantic_relevance(built, tap) -> None:
    vlm = built["llava"]
    parts = vlm.attention_parts(-1)
    probes = case_probes()
    keys, values = memory(vlm, layers=(-1,), scale=3.0)
    seen = tap(parts)  # registered first: its pre-hook sees each pass's h_pre before the semantic call

    def current_pre() -> Tensor:
        return seen.h_pre[-1].reshape(-1, seen.h_pre[-1].shape[-1])

    def orthogonal(_layer: int, _state: Tensor) -> Tensor:
        unit = torch.nn.functional.normalize(current_pre(), dim=-1)
        v = torch.randn_like(unit)
        return v - (v * unit).sum(-1, keepdim=True) * unit

    encoders: dict[str, Callable[[int, Tensor], Tensor]] = {
        "random": lambda _l, s: s @ torch.ones(s.shape[-1], s.shape[-1]).triu(),
        "aligned": lambda _l, s: 2.0 * current_pre(),
        "opposite": lambda _l, s: -current_pre(),
        "zero": lambda _l, s: torch.zeros_like(s),
        "orthogonal": orthogonal,
    }
    base = logits(vlm, probes)
    alphas: dict[str, Tensor] = {}
    for name, encoder in encoders.items():
        knowledge = LatentKnowledge(
            vlm, [-1], keys, values, alpha="adaptive", semantic=encoder, record_alpha=True
        )
        with knowledge.attach():
            shifted = logits(vlm, probes)
        alphas[name] = knowledge.last_alpha[-1]
        if name in ("opposite", "zero"):
            assert torch.equal(shifted, base)  # no relevance, no knowledge: the model as it was
    for alpha in alphas.values():
        assert alpha.shape == base.shape[:2]
        assert bool(((alpha >= 0) & (alpha <= 1)).all())
    assert torch.equal(alphas["opposite"], torch.ones_like(alphas["opposite"]))
    assert torch.equal(alphas["zero"], torch.ones_like(alphas["zero"]))
    torch.testing.assert_close(alphas["orthogonal"], torch.ones_like(alphas["orthogonal"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(alphas["aligned"], torch.zeros_like(alphas["aligned"]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------- image positions
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_text_positions_leave_image_tokens_alone(built, tap, name) -> None:
    vlm = built[name]
    parts = vlm.attention_parts(-1)
    probes = case_probes()
    batch = vlm.build_batch(probes)
    image = batch.inputs["input_ids"] == vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
    assert image.any()
    before = tap(parts)
    logits(vlm, probes)
    before.remove()
    keys, values = memory(vlm, layers=(-1,), scale=3.0)
    knowledge = LatentKnowledge(vlm, [-1], keys, values, alpha=0.5, positions="text", record_alpha=True)
    with knowledge.attach():
        after = tap(parts)  # after the memory's hook: sees the shifted output
        logits(vlm, probes)
        vlm.generate(probes[:2])  # decoding steps: text positions only, ids of one token each
    plain, shifted = before.out[0], after.out[0]
    assert torch.equal(shifted[image], plain[image])
    assert not torch.allclose(shifted[~image], plain[~image])
    assert knowledge.last_alpha is not None and bool((knowledge.last_alpha[-1] == 0.5).all())


# ----------------------------------------------------------------- causal: teacher-forced, cached, greedy
@pytest.mark.parametrize("name", ["llava", "blip2_opt", "qwen2_vl"])
@pytest.mark.parametrize("alpha", [0.5, "adaptive"])
def test_greedy_answers_read_off_the_pass_equal_decoding_with_the_hooks(
    built, monkeypatch, name, alpha
) -> None:
    vlm = built[name]
    keys, values = memory(vlm, scale=3.0)
    knowledge = LatentKnowledge(
        vlm, [-2, -1], keys, values, top_k=8, alpha=alpha, semantic=lambda _l, s: s, positions="text"
    )
    with knowledge.attach():
        # The greedy answers, decoded step by step on the KV cache with the hooks on...
        asked = own_answers(vlm, greedy_probes(), monkeypatch)
        decoded = DecodeCounter(vlm, monkeypatch)
        # ...are what one teacher-forced pass over them picks at every position: nothing is decoded.
        assert vlm.generate(asked, teacher_forced=vlm.teacher_forced(asked)) == [p.answer for p in asked]
        assert decoded.rows == 0


def test_a_prefix_cached_pass_scores_like_the_plain_one_with_the_hooks(built, monkeypatch) -> None:
    vlm = built["llava"]
    monkeypatch.setattr(prefix_cache, "MIN_SAVING", 0.0)
    monkeypatch.setattr(prefix_cache, "MIN_SAVED_WORK", 0)
    probes = greedy_probes()[3:] + case_probes()
    assert len(plan_chunk(vlm, probes).shared()) >= 2  # some rows really run on a cached prefix
    keys, values = memory(vlm, scale=3.0)
    with LatentKnowledge(vlm, [-2, -1], keys, values, top_k=8, alpha=0.4, positions="text").attach():
        batch = vlm.build_batch(probes)
        full = logits(vlm, probes)
        for i, got in enumerate(row_logits(vlm, probes)):
            torch.testing.assert_close(got, full[i, : batch.lengths[i]], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- dtype, gradients
def test_bfloat16_computes_in_the_states_dtype(tap) -> None:
    vlm = LlavaVLM(tiny=TinySpec()).to(torch.bfloat16)
    parts = vlm.attention_parts(-1)
    keys, values = memory(vlm, scale=3.0)  # float32 entries: moved to bf16 once
    encoder = torch.nn.Linear(32, 32)  # a float32 Enc_Sem, as trained on float32 knowledge states
    knowledge = LatentKnowledge(
        vlm, [-2, -1], keys, values, alpha="adaptive", semantic=lambda _l, s: encoder(s), record_alpha=True
    )
    with knowledge.attach():
        seen = tap(parts)  # after the memory's hook: sees the shifted outputs
        vlm.teacher_forced(case_probes())
        vlm.generate(case_probes()[:2])
    assert all(out.dtype == torch.bfloat16 and torch.isfinite(out).all() for out in seen.out)
    assert knowledge.last_alpha is not None and knowledge.last_alpha[-1].dtype == torch.float32
    with torch.no_grad():
        read = knowledge.read(-1, seen.h_pre[0][0].to(torch.bfloat16))
    assert read.h_know.dtype == torch.bfloat16


def test_gradients_flow_through_the_hooks_after_an_inference_pass() -> None:
    vlm = LlavaVLM(tiny=TinySpec())
    keys, values = memory(vlm, scale=3.0)
    knowledge = LatentKnowledge(vlm, [-2, -1], keys, values, alpha="adaptive", semantic=lambda _l, s: s)
    probes = case_probes()
    with knowledge.attach():
        vlm.teacher_forced(probes)  # the memory is first moved and normalised in inference mode
        vlm.loss(probes).backward()
    parts = vlm.attention_parts(-2)
    for p in (parts.q_proj.weight, parts.k_proj.weight, parts.v_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_training_loss_replaying_the_upper_layers_sees_the_same_shift() -> None:
    # UniKE trains its added neurons in the layers the memory shifts: `VLM.training_loss` replays
    # those layers from recorded inputs, and must compute what the full forward with the hooks does.
    vlm = LlavaVLM(tiny=TinySpec())
    vlm.requires_grad_(False)
    trained = list(vlm.ffn(-1).parameters())
    for p in trained:
        p.requires_grad_(True)
    keys, values = memory(vlm, scale=3.0)
    knowledge = LatentKnowledge(
        vlm, [-2, -1], keys, values, alpha="adaptive", semantic=lambda _l, s: s, positions="text"
    )
    probes = case_probes()
    with knowledge.attach():
        full = vlm.loss(probes)
        with vlm.training_loss(trained).over(probes) as loss:
            first, second = loss(), loss()
            assert loss.replayed_from_layer == vlm.num_language_layers - 1
    assert torch.equal(first, full) and torch.equal(second, full)
