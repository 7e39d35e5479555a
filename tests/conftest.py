"""Shared fixtures: tiny backbones built from configs and in-memory edit cases. No network."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from core.case import EditCase, Probe

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def solid_image(
    color: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB"
) -> Image.Image:
    img = Image.new("RGB", size, color)
    return img if mode == "RGB" else img.convert(mode)


def make_case(index: int = 0, hops: tuple[int, ...] = (1, 2)) -> EditCase:
    """An edit case with every probe kind, images of different sizes, and multi-hop portability."""
    edit_img = solid_image((200, 30, 30), (48, 40))
    other_img = solid_image((190, 40, 35), (32, 64))
    loc_img = solid_image((20, 20, 220), (30, 30))
    edit = Probe("Where is this landmark?", f"Rome {index}", edit_img, kind="rel")
    probes = {
        "rel": [edit],
        "t_gen": [Probe("In which city is this landmark?", f"Rome {index}", edit_img, kind="t_gen")],
        "i_gen": [Probe("Where is this landmark?", f"Rome {index}", other_img, kind="i_gen")],
        "t_loc": [Probe("Who wrote Hamlet?", "Shakespeare", None, kind="t_loc")],
        "i_loc": [Probe("What colour is this?", "blue", loc_img, kind="i_loc")],
        "port": [
            Probe(f"Which country is this landmark in ({h} hops)?", "Italy", edit_img, kind="port", hop=h)
            for h in hops
        ],
    }
    return EditCase(case_id=f"case-{index}", index=index, edit=edit, probes=probes, source="memory")


@pytest.fixture
def tiny_llava():
    from backbones import LlavaVLM, TinySpec

    return LlavaVLM(tiny=TinySpec())


@pytest.fixture
def cases():
    return [make_case(i) for i in range(3)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (trained-editor modules use it through `pytestmark`).

    Tiny models gain nothing from a second thread, and on a shared 2-core machine two threads spin
    against each other (and against other test processes).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm():
    """A tiny LLaVA with frozen weights, shared by a module's tests (a module may define its own `vlm`)."""
    from backbones import LlavaVLM, TinySpec

    model = LlavaVLM(tiny=TinySpec())
    model.requires_grad_(False)
    return model


def state_copy(vlm) -> dict:
    """A copy of every tensor of the backbone, to compare with after an edit."""
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def changed(vlm, before: dict) -> list[str]:
    """Names of the backbone's tensors that differ from `before`, bit for bit."""
    import torch

    after = vlm.model.state_dict()
    assert after.keys() == before.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]
