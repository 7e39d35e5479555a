"""Greedy answers read off the teacher-forced pass equal decoding them, and spare the decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import solid_image
from tiny_families import FAMILIES
from transformers import GenerationConfig

from backbones import VLM
from backbones.greedy_from_tf import eos_token_ids, greedy_altering_settings, greedy_tokens
from core.case import ContextItem, Probe


def t(*ids: int) -> torch.Tensor:
    return torch.tensor(ids)


def test_picks_follow_the_gold_path_to_the_first_departure() -> None:
    labels = t(5, 6, 7)
    assert greedy_tokens(t(5, 6, 7), labels, 3, eos=set()) == [5, 6, 7]
    # Leaving the answer at its last token: nothing further is needed.
    assert greedy_tokens(t(5, 6, 9), labels, 3, eos=set()) == [5, 6, 9]
    # Leaving it earlier: the next pick depends on a prefix the pass never saw.
    assert greedy_tokens(t(5, 9, 7), labels, 3, eos=set()) is None
    assert greedy_tokens(t(9, 6, 7), labels, 3, eos=set()) is None
    # A budget past the answer (max_new_tokens > 0) needs a pick the pass does not make...
    assert greedy_tokens(t(5, 6, 7), labels, 4, eos=set()) is None
    # ...unless the row stops or leaves the answer first.
    assert greedy_tokens(t(5, 2, 7), labels, 4, eos={2}) == [5, 2]
    assert greedy_tokens(t(5, 6, 9), labels, 3, eos={9}) == [5, 6, 9]


def test_an_end_of_sequence_pick_ends_the_row_even_on_the_gold_path() -> None:
    assert greedy_tokens(t(2, 6), t(2, 6), 2, eos={2}) == [2]
    assert greedy_tokens(t(), t(), 0, eos=set()) == []


def test_settings_that_change_greedy_picks_are_named() -> None:
    assert greedy_altering_settings(GenerationConfig()) == []
    # Sampling settings do not matter: generation here never samples.
    assert greedy_altering_settings(GenerationConfig(temperature=0.7, top_k=20, top_p=0.8)) == []
    changed = GenerationConfig(repetition_penalty=1.05, no_repeat_ngram_size=3, bad_words_ids=[[4]])
    assert greedy_altering_settings(changed) == [
        "repetition_penalty",
        "no_repeat_ngram_size",
        "bad_words_ids",
    ]
    assert eos_token_ids([GenerationConfig(eos_token_id=[2, 7]), GenerationConfig(eos_token_id=3)]) == {
        2,
        3,
        7,
    }


def probes() -> list[Probe]:
    red, blue = solid_image((200, 30, 30), (48, 40)), solid_image((20, 20, 220), (30, 30))
    fact = ContextItem("New fact: this is Rome", red)
    return [
        Probe("Where is this landmark?", "Rome", red),
        Probe("Who wrote Hamlet?", "Shakespeare", None, kind="t_loc"),
        Probe("What colour is this?", "blue", blue, kind="i_loc"),
        Probe("Where is this landmark?", "Rome", red, context=(fact,)),
        Probe("Name a river.", "Nile", None, kind="t_loc", context=(fact,)),
    ]


class DecodeCounter:
    """Counts the rows that reach the model's `generate`."""

    def __init__(self, vlm: VLM, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        real = vlm.model.generate

        def counting(*args, **kwargs):
            self.rows += kwargs["input_ids"].shape[0]
            return real(*args, **kwargs)

        monkeypatch.setattr(vlm.model, "generate", counting)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request) -> VLM:
    return FAMILIES[request.param]()


def own_answers(vlm: VLM, asked: list[Probe], monkeypatch: pytest.MonkeyPatch) -> list[Probe]:
    """The probes with the model's own greedy tokens as their answers, so that their gold path is greedy.

    A random model's bytes seldom decode to text that tokenises back to the same ids, so the answers
    are tied to their tokens directly: `encode_answer` returns the recorded ids for these texts.
    """
    tokens: dict[str, list[int]] = {}
    decode = vlm._decode_generated

    def record(row, budget: int) -> str:
        text = decode(row, budget)
        tokens[text] = [int(x) for x in row][:budget]
        return text

    with pytest.MonkeyPatch.context() as recording:
        recording.setattr(vlm, "_decode_generated", record)
        recording.setattr(vlm, "reuse_teacher_forced", False)
        said = vlm.generate(asked)
    encode = vlm.encode_answer
    monkeypatch.setattr(vlm, "encode_answer", lambda answer: tokens.get(answer) or encode(answer))
    return [
        Probe(p.prompt, text, p.image, p.kind, p.hop, p.context) for p, text in zip(asked, said, strict=True)
    ]


@pytest.mark.parametrize("max_new_tokens", [0, 2])
def test_reading_answers_off_the_pass_equals_decoding(vlm, monkeypatch, max_new_tokens) -> None:
    asked = probes() + own_answers(vlm, probes(), monkeypatch)
    monkeypatch.setattr(vlm, "max_new_tokens", max_new_tokens)
    decoded = DecodeCounter(vlm, monkeypatch)
    monkeypatch.setattr(vlm, "reuse_teacher_forced", False)
    expected = vlm.generate(asked, teacher_forced=vlm.teacher_forced(asked))
    assert decoded.rows == len(asked)
    monkeypatch.setattr(vlm, "reuse_teacher_forced", True)
    decoded.rows = 0
    assert vlm.generate(asked, teacher_forced=vlm.teacher_forced(asked)) == expected
    if max_new_tokens == 0:
        # Rows on the model's own greedy path (and one-token answers) are never decoded.
        assert decoded.rows < len(asked)


def test_own_greedy_answers_need_no_decoding(vlm, monkeypatch) -> None:
    asked = own_answers(vlm, probes(), monkeypatch)
    decoded = DecodeCounter(vlm, monkeypatch)
    assert vlm.generate(asked, teacher_forced=vlm.teacher_forced(asked)) == [p.answer for p in asked]
    assert decoded.rows == 0


def test_a_greedy_altering_setting_decodes_every_row(vlm, monkeypatch) -> None:
    asked = own_answers(vlm, probes(), monkeypatch)
    for config in vlm.generation_configs():
        monkeypatch.setattr(config, "repetition_penalty", 1.3)
    decoded = DecodeCounter(vlm, monkeypatch)
    vlm.generate(asked, teacher_forced=vlm.teacher_forced(asked))
    assert decoded.rows == len(asked)
