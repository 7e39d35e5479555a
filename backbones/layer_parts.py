"""Where a decoder layer's attention and feed-forward block take their input and give their output.

Methods that add computation inside a layer without touching its weights (T-Patcher's and UniKE's
added FFN neurons, UniKE's latent in-context knowledge) hook these modules. Decoder layers of the
families differ only in attribute names (`o_proj` or `out_proj`, an `mlp` submodule or OPT's
`fc1`/`fc2` on the layer), so the parts are found by what a layer holds, never by a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionParts:
    """One layer's self-attention: the module and its projections.

    `module`'s input `hidden_states` is the pre-attention state (after the layer's input norm) and its
    output's first element the attention output before the residual add, in the residual width.
    """

    module: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class FfnPorts:
    """One layer's feed-forward block as two hook points.

    `input_module`'s first input is the FFN's input q (the normed residual); `output_module`'s output
    is the FFN's output before the residual add. A Llama-style `mlp` is both; OPT's are fc1 and fc2.
    `value_linear` is the FFN's last projection (`down_proj`, OPT's `fc2`): its input is the hidden
    activation (the "keys" of locate-then-edit methods, the "neurons" of knowledge-neuron methods)
    and each column of its weight is the value vector one hidden unit writes into the residual.
    """

    input_module: nn.Module
    output_module: nn.Module
    value_linear: nn.Linear


def attention_parts(layer: nn.Module) -> AttentionParts:
    """The self-attention parts of one decoder layer (Llama, OPT, Qwen2 naming)."""
    module = getattr(layer, "self_attn", None)
    if module is None:
        raise ValueError(f"{type(layer).__name__} has no self_attn: its attention cannot be located")
    out = getattr(module, "o_proj", None) or getattr(module, "out_proj", None)
    projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if out is None or any(p is None for p in projections):
        raise ValueError(
            f"{type(module).__name__} has no q_proj/k_proj/v_proj with o_proj or out_proj: "
            "its attention cannot be recomputed"
        )
    q_proj, k_proj, v_proj = projections
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"{type(module).__name__} does not say its head_dim")
    return AttentionParts(
        module=module,
        q_proj=q_proj,
        k_proj=k_proj,
        v_proj=v_proj,
        o_proj=out,
        num_heads=q_proj.out_features // head_dim,
        num_kv_heads=k_proj.out_features // head_dim,
        head_dim=head_dim,
    )


def ffn_ports(layer: nn.Module) -> FfnPorts:
    """The feed-forward block's input and output hook points of one decoder layer."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        down = getattr(mlp, "down_proj", None) or getattr(mlp, "fc2", None)
        if not isinstance(down, nn.Linear):
            raise ValueError(
                f"{type(mlp).__name__} has no down_proj or fc2 Linear: its value vectors cannot be located"
            )
        return FfnPorts(mlp, mlp, down)
    fc1, fc2 = getattr(layer, "fc1", None), getattr(layer, "fc2", None)
    if fc1 is not None and isinstance(fc2, nn.Linear):
        return FfnPorts(fc1, fc2, fc2)
    raise ValueError(f"{type(layer).__name__} has neither an mlp nor fc1/fc2: its FFN cannot be located")
