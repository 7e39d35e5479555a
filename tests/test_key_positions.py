"""`VLM.key_positions`: where locate-then-edit methods read a fact's key, the same rule for every family."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_families import FAMILIES

from backbones import VLM
from core.case import Probe


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request) -> VLM:
    return FAMILIES[request.param]()


def probes() -> list[Probe]:
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    # Two lengths, so the shorter row is padded.
    return [
        Probe("Which country is this object from?", "Italy", img),
        Probe("Who made this object?", "Bob Smith", img),
    ]


def _token(vlm: VLM, batch, row: int, pos: int) -> int:
    return int(batch.inputs["input_ids"][row, pos])


def test_image_position_is_the_last_image_token(vlm: VLM) -> None:
    ps = probes()
    batch = vlm.build_batch(ps)
    image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
    for row, pos in enumerate(vlm.key_positions(ps, batch, "image")):
        assert _token(vlm, batch, row, pos) == image_id
        assert image_id not in batch.inputs["input_ids"][row, pos + 1 :].tolist()


def test_question_and_span_positions_end_their_text(vlm: VLM) -> None:
    ps = probes()
    batch = vlm.build_batch(ps)
    question = vlm.key_positions(ps, batch, "question")
    span = vlm.key_positions(ps, batch, "span", span="this object")
    end = vlm.key_positions(ps, batch, "prompt_end")
    for row, probe in enumerate(ps):
        decoded = vlm.tokenizer.decode(batch.inputs["input_ids"][row, : question[row] + 1])
        assert decoded.rstrip().endswith(probe.prompt.rstrip("?").split()[-1] + "?")
        assert vlm.tokenizer.decode(batch.inputs["input_ids"][row, : span[row] + 1]).endswith("this object")
        assert span[row] < question[row] <= end[row]
        # The last prompt position predicts the first answer token.
        assert end[row] == batch.answer_spans[row][0] - 1


def test_left_padded_rows_give_the_same_tokens(vlm: VLM) -> None:
    ps = probes()
    right = vlm.build_batch(ps)
    left = vlm.build_batch(ps, with_answers=False)
    for where in ("image", "question", "prompt_end"):
        for row, (r, lp) in enumerate(
            zip(vlm.key_positions(ps, right, where), vlm.key_positions(ps, left, where), strict=True)
        ):
            assert _token(vlm, right, row, r) == _token(vlm, left, row, lp)


def test_bad_positions_are_refused(vlm: VLM) -> None:
    ps = probes()
    batch = vlm.build_batch(ps)
    with pytest.raises(ValueError, match="key position must be one of"):
        vlm.key_positions(ps, batch, "subject")
    with pytest.raises(ValueError, match="does not occur"):
        vlm.key_positions(ps, batch, "span", span="Eiffel tower")
    text = [Probe("Who wrote Hamlet?", "Shakespeare")]
    with pytest.raises(ValueError, match="no image token"):
        vlm.key_positions(text, vlm.build_batch(text), "image")
