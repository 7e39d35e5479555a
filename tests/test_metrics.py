"""Scores on hand-built logits: teacher forcing, both locality protocols, generation twins, ScoreSet and DDP merges.

No model is loaded (importing the backbones costs seconds); logits are built so that the argmax or the
full ranking at every position is known, and every expected value below is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from backbones.batching import IGNORE_INDEX, TeacherForced, teacher_forced_outputs
from metrics import (
    CaseMeanScore,
    Portability,
    Reliability,
    ScoreSet,
    case_values,
    exact_match,
    generation_score,
    normalize_answer,
    probe_score,
    token_accuracy,
    token_agreement,
    topk_needed,
)

VOCAB = 20


def ranked_logits(rankings: list[list[int]], width: int | None = None) -> torch.Tensor:
    """(T, VOCAB) logits whose descending order at position t starts with `rankings[t]`.

    Listed ids get scores 100, 99, ...; unlisted ids stay below them in id order, so any top-k is known.
    Rows shorter than `width` are padded with positions whose argmax is id 19 (garbage padding).
    """
    width = width or len(rankings)
    logits = -torch.arange(VOCAB, dtype=torch.float).repeat(width, 1) / 100
    for t in range(len(rankings), width):
        logits[t, VOCAB - 1] = 50.0
    for t, order in enumerate(rankings):
        for rank, token in enumerate(order):
            logits[t, token] = 100.0 - rank
    return logits


def labels_row(width: int, span: tuple[int, int], answer: list[int]) -> torch.Tensor:
    row = torch.full((width,), IGNORE_INDEX)
    row[span[0] : span[1]] = torch.tensor(answer)
    return row


# --------------------------------------------------------------------------- teacher forcing
def test_multi_token_answer_is_predicted_by_the_previous_positions():
    # Row of 6 tokens, answer at positions 3..5 = [7, 8, 9]; logits 2, 3, 4 predict it.
    logits = ranked_logits([[1], [1], [7], [8], [3], [5]]).unsqueeze(0)
    labels = labels_row(6, (3, 6), [7, 8, 9]).unsqueeze(0)
    (out,) = teacher_forced_outputs(logits, labels, [(3, 6)], [6])
    assert out.pred.tolist() == [7, 8, 3]
    assert out.labels.tolist() == [7, 8, 9]
    assert out.all_topk is None
    assert token_accuracy(out.pred, out.labels) == pytest.approx(2 / 3)
    assert probe_score("rel", out) == pytest.approx(2 / 3)


def test_right_padding_does_not_change_scores():
    long_rows = [[1], [4], [7], [8], [3], [5]]
    short_rows = [[2], [6], [6], [0]]
    long_labels = labels_row(6, (3, 6), [7, 8, 9])
    short_labels = labels_row(4, (2, 4), [6, 1])
    batch_logits = torch.stack([ranked_logits(long_rows), ranked_logits(short_rows, width=6)])
    batch_labels = torch.stack([long_labels, torch.cat([short_labels, torch.full((2,), IGNORE_INDEX)])])
    batched = teacher_forced_outputs(batch_logits, batch_labels, [(3, 6), (2, 4)], [6, 4], all_topk=3)
    alone = [
        teacher_forced_outputs(ranked_logits(long_rows)[None], long_labels[None], [(3, 6)], [6], all_topk=3)[
            0
        ],
        teacher_forced_outputs(
            ranked_logits(short_rows)[None], short_labels[None], [(2, 4)], [4], all_topk=3
        )[0],
    ]
    for b, a in zip(batched, alone, strict=True):
        assert torch.equal(b.pred, a.pred) and torch.equal(b.labels, a.labels)
        assert torch.equal(b.all_topk, a.all_topk)
    # The padded row's top-k stops at its length: the padding (argmax 19) never enters locality.
    assert batched[1].all_topk.shape == (4, 3)
    assert 19 not in batched[1].all_topk[:, 0].tolist()
    assert [token_accuracy(o.pred, o.labels) for o in batched] == pytest.approx([2 / 3, 1 / 2])


def test_teacher_forced_outputs_rejects_bad_spans():
    logits = ranked_logits([[1]] * 4)[None]
    labels = labels_row(4, (0, 2), [1, 1])[None]
    with pytest.raises(ValueError, match="position 0"):
        teacher_forced_outputs(logits, labels, [(0, 2)], [4])
    with pytest.raises(ValueError, match="inside the row"):
        teacher_forced_outputs(logits, labels, [(2, 5)], [4])
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        teacher_forced_outputs(logits, labels, [(2, 4)], [4])
    with pytest.raises(ValueError, match="1 rows"):
        teacher_forced_outputs(logits, labels, [(1, 2), (1, 2)], [4, 4])


# --------------------------------------------------------------------------- token scores
def test_token_accuracy_and_agreement():
    assert token_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, IGNORE_INDEX])) == pytest.approx(
        2 / 3
    )
    assert token_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        token_agreement(torch.zeros(3, 10), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="no answer tokens"):
        token_accuracy(torch.tensor([]), torch.tensor([]))


def test_top10_agreement_is_position_and_rank_wise():
    pre = torch.arange(10).repeat(3, 1)  # 3 positions, ids 0..9 in rank order
    post = pre.clone()
    post[0, [8, 9]] = post[0, [9, 8]]  # same set, two ranks swapped: 2 entries disagree
    post[2, 0] = 15  # a new top-1 id: 1 entry disagrees
    assert token_agreement(post, pre) == pytest.approx(27 / 30)


# --------------------------------------------------------------------------- protocols
def _locality_pair() -> tuple[TeacherForced, TeacherForced]:
    """Pre/post outputs of one locality probe of 5 tokens whose answer sits at positions 3..4.

    Answer positions are predicted by logits 2 and 3. Post-edit, top-1 changes at prompt positions 0
    and 1 only; at position 2 ranks 9 and 10 swap and at position 4 rank 2 changes.
    """
    pre_rank = [[r, *[(r + j) % VOCAB for j in range(1, 10)]] for r in (4, 5, 6, 7, 8)]
    post_rank = [list(r) for r in pre_rank]
    post_rank[0][0], post_rank[1][0] = 15, 16
    post_rank[2][8], post_rank[2][9] = post_rank[2][9], post_rank[2][8]
    post_rank[4][1] = 0
    labels = labels_row(5, (3, 5), [1, 2])[None]
    (pre,) = teacher_forced_outputs(ranked_logits(pre_rank)[None], labels, [(3, 5)], [5], all_topk=10)
    (post,) = teacher_forced_outputs(ranked_logits(post_rank)[None], labels, [(3, 5)], [5], all_topk=10)
    return post, pre


def test_strict_and_mmedit_trainer_locality_differ_as_computed_by_hand():
    post, pre = _locality_pair()
    # strict: argmax at the answer positions (logits 2 and 3) is unchanged.
    assert probe_score("t_loc", post, pre) == 1.0
    assert probe_score("i_loc", post, pre, protocol="strict") == 1.0
    # mmedit_trainer t_loc: top-1 over all 5 positions; positions 0 and 1 changed -> 3/5.
    assert probe_score("t_loc", post, pre, protocol="mmedit_trainer") == pytest.approx(0.6)
    # mmedit_trainer i_loc: 50 top-10 entries; 1 + 1 (top-1 at 0, 1) + 2 (swap at 2) + 1 (rank 2 at 4) differ.
    assert probe_score("i_loc", post, pre, protocol="mmedit_trainer") == pytest.approx(45 / 50)
    # Accuracy kinds are the same under both protocols.
    assert probe_score("rel", post, None, "mmedit_trainer") == probe_score("rel", post, None, "strict")


def test_topk_needed_and_protocol_errors():
    assert [topk_needed("strict", k) for k in ("rel", "t_loc", "i_loc", "port")] == [0, 0, 0, 0]
    assert [topk_needed("mmedit_trainer", k) for k in ("rel", "t_loc", "i_loc", "port")] == [0, 1, 10, 0]
    post, pre = _locality_pair()
    with pytest.raises(ValueError, match="needs the unedited"):
        probe_score("i_loc", post, None)
    with pytest.raises(ValueError, match="all_topk=None"):
        probe_score("t_loc", TeacherForced(post.pred, post.labels), pre, "mmedit_trainer")
    shorter = TeacherForced(pre.pred, pre.labels, pre.all_topk[1:])
    with pytest.raises(ValueError, match="undefined for editors"):
        probe_score("i_loc", post, shorter, "mmedit_trainer")
    with pytest.raises(ValueError, match="unknown protocol"):
        probe_score("rel", post, None, "loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown probe kind"):
        topk_needed("strict", "loc")


# --------------------------------------------------------------------------- generation twins
def test_normalisation_and_exact_match():
    assert normalize_answer("  The Eiffel   Tower!  ") == "eiffel tower"
    assert exact_match("An apple.", "apple") == 1.0
    assert exact_match(" ROME\nQuestion: where is Paris?", "Rome") == 1.0
    assert exact_match("\nRome", "rome") == 1.0  # leading blank line is not the answer
    assert exact_match("Rome is the capital", "Rome") == 0.0  # text on the answer's line counts


def test_generation_score_twins():
    assert generation_score("rel", "the Colosseum.\nmore", "Colosseum") == 1.0
    assert generation_score("port", "France", "Italy") == 0.0
    # Locality compares post-edit with pre-edit generation, not with the dataset answer.
    assert generation_score("t_loc", "Shakespeare!\nQ:", "Marlowe", "shakespeare\nA:") == 1.0
    assert generation_score("i_loc", "red", "blue", "blue") == 0.0
    with pytest.raises(ValueError, match="pre_generated"):
        generation_score("i_loc", "red", "blue")


# --------------------------------------------------------------------------- Metric classes
def test_case_mean_score_percent_and_nan():
    metric = Reliability()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))
    metric.update(torch.tensor([1.0, 0.25]))
    assert float(metric.compute()) == pytest.approx(62.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.tensor([1.5]))
    assert Portability(generation=True, hop=3).name == "gen_port_hop3"
    assert issubclass(Reliability, CaseMeanScore) and Reliability.kind == "rel"


def test_accuracy_is_averaged_per_case_not_per_token():
    # Case A: 1-token answer, right. Case B: 4-token answer, 1 right. Per case: (1 + 0.25) / 2.
    a = TeacherForced(torch.tensor([5]), torch.tensor([5]))
    b = TeacherForced(torch.tensor([1, 0, 0, 0]), torch.tensor([1, 2, 3, 4]))
    scores = ScoreSet()
    for out in (a, b):
        scores.update_case(case_values({"rel": [probe_score("rel", out)]}))
    assert scores.compute()["rel"] == pytest.approx(62.5)  # per token it would be 40.0


def test_case_values_per_kind_and_hop():
    values = case_values({"rel": [1.0], "t_loc": [], "port": [1.0, 0.0, 0.5]}, port_hops=[1, 2, 2])
    assert values == {"rel": 1.0, "port": 0.5, "port_hop1": 1.0, "port_hop2": 0.25}
    gen = case_values({"port": [1.0, 0.0]}, port_hops=[None, 3], prefix="gen_")
    assert gen == {"gen_port": 0.5, "gen_port_hop3": 0.0}
    with pytest.raises(ValueError, match="port_hops"):
        case_values({"port": [1.0]}, port_hops=[1, 2])


def test_score_set_keys_hops_and_nan_for_absent_kinds():
    scores = ScoreSet(max_hops=4)
    kinds = ["rel", "t_gen", "i_gen", "t_loc", "i_loc", "port"]
    hops = [f"port_hop{h}" for h in range(1, 5)]
    assert scores.keys() == kinds + [f"gen_{k}" for k in kinds] + hops + [f"gen_{h}" for h in hops]
    scores.update_case({"rel": 1.0, "gen_rel": 0.0, "port": 0.5, "port_hop2": 0.5, "gen_port_hop2": 1.0})
    scores.update_case({"rel": 0.5, "t_loc": 1.0, "port_hop1": 0.0})
    result = scores.compute()
    assert list(result) == scores.keys()
    assert result["rel"] == pytest.approx(75.0) and result["gen_rel"] == 0.0
    assert result["port_hop1"] == 0.0 and result["port_hop2"] == 50.0 and result["gen_port_hop2"] == 100.0
    absent = {"t_gen", "i_gen", "i_loc", "gen_t_loc", "port_hop3", "port_hop4", "gen_port_hop1", "gen_port"}
    assert all(math.isnan(result[k]) for k in absent)
    with pytest.raises(ValueError, match="max_hops=4"):
        scores.update_case({"port_hop5": 1.0})
    with pytest.raises(ValueError, match="unknown score"):
        scores.update_case({"loc": 1.0})
    scores.reset()
    assert all(math.isnan(v) for v in scores.compute().values())


def test_ddp_like_merge_equals_one_process():
    generator = torch.Generator().manual_seed(0)
    cases = []
    for i in range(9):
        values = torch.rand(6, generator=generator).tolist()
        case = {"rel": values[0], "gen_rel": round(values[1]), "t_loc": values[2]}
        if i % 3 == 0:  # only some cases have a hop-3 portability probe; rank 1 never sees one
            case[f"port_hop{1 + i % 2 * 2}"] = values[3]
        cases.append(case)
    whole, rank0, rank1 = ScoreSet(), ScoreSet(), ScoreSet()
    whole.update_cases(cases)
    for i, case in enumerate(cases):
        (rank0 if i < 5 else rank1).update_case(case)
    expected = whole.compute()
    # A sum all-reduce of the states, done by hand for one score ...
    total = rank0["rel"].total + rank1["rel"].total
    count = rank0["rel"].count + rank1["rel"].count
    assert float(100 * total / count) == pytest.approx(expected["rel"])
    # ... and for all of them through torchmetrics' merge_state.
    rank0.merge_state(rank1)
    merged = rank0.compute()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(merged[key])) or merged[key] == pytest.approx(value), key
