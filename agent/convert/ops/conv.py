"""Family "conv" (native/onnx/ops_conv.c): Conv, 1-D and 2-D.

Weights must be constants: they are packed here into the SGEMM's row panels
(per group). A depthwise Conv (one input channel per group) runs a direct kernel.
BatchNormalization, a per-channel Add, a residual Add and an activation after the
Conv arrive folded or fused by agent/convert/passes.py.
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering
from agent.convert.ops.linear import (
    FUSED_ACTIVATION,
    FUSED_BIAS,
    FUSED_RESIDUAL,
    activation_epilogue,
    pack_a,
    work_bytes,
)

BASE = FAMILY_BASE["conv"]
CONV = BASE + 0
CONV_DW = BASE + 1
OPCODES = {"conv": CONV, "conv_dw": CONV_DW}


def conv_pads(node: Node, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Begin pads then end pads, one per spatial axis, from ``pads`` or ``auto_pad``."""
    rank = len(spatial)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "", None):
        pads = [int(p) for p in node.attr("pads", [0] * (2 * rank))]
        if len(pads) != 2 * rank:
            raise Unsupported(f"pads has {len(pads)} values for {rank} spatial axes")
        return pads
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {auto_pad!r} is not supported")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        if auto_pad == "SAME_UPPER":
            begin.append(small)
            end.append(total - small)
        else:
            begin.append(total - small)
            end.append(small)
    return begin + end


@lowering("Conv")
def lower_conv(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    if x.dtype != np.float32:
        raise Unsupported(f"input is {x.dtype}; only float32 is supported")
    rank = len(x.shape) - 2
    if rank == 3:
        raise Unsupported("3-D convolution (5-D input) is not supported")
    if rank not in (1, 2):
        raise Unsupported(f"input of rank {len(x.shape)}: only 1-D and 2-D convolutions (rank 3 and 4) are supported")
    w = lw.require_const(node, 1, "the weights")
    bias = None
    if lw.has_input(node, 2):
        bias = lw.require_const(node, 2, "the bias").astype(np.float64)
    cin, cout = x.shape[1], w.shape[0]
    group = int(node.attr("group", 1))
    if w.ndim != rank + 2:
        raise Unsupported(f"weights of rank {w.ndim} for a {rank}-D convolution")
    if group < 1 or cin % group or cout % group or w.shape[1] != cin // group:
        raise Unsupported(
            f"group {group} does not fit {cin} input and {cout} output channels (weights {list(w.shape)})"
        )
    kernel = [int(k) for k in node.attr("kernel_shape", list(w.shape[2:]))]
    if kernel != list(w.shape[2:]):
        raise Unsupported(f"kernel_shape {kernel} differs from the weights' {list(w.shape[2:])}")
    strides = [int(s) for s in node.attr("strides", [1] * rank)]
    dilations = [int(d) for d in node.attr("dilations", [1] * rank)]
    if len(strides) != rank or len(dilations) != rank or min(strides + dilations) < 1:
        raise Unsupported(f"strides {strides} / dilations {dilations} do not fit {rank} spatial axes")
    spatial = list(x.shape[2:])
    pads = conv_pads(node, spatial, kernel, strides, dilations)
    if min(pads) < 0:
        raise Unsupported(f"negative pads {pads}")
    out_spatial = [
        (size + pads[i] + pads[i + rank] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i, size in enumerate(spatial)
    ]
    if list(y.shape[2:]) != out_spatial or y.shape[1] != cout:
        raise Unsupported(f"output shape {list(y.shape)} differs from the computed [N, {cout}, {out_spatial}]")
    if rank == 1:
        h, wd, kh, kw, sh, sw, dh, dw, pt, pl = 1, spatial[0], 1, kernel[0], 1, strides[0], 1, dilations[0], 0, pads[0]
        ho, wo = 1, out_spatial[0]
    else:
        h, wd = spatial
        kh, kw = kernel
        sh, sw = strides
        dh, dw = dilations
        pt, pl = pads[0], pads[1]
        ho, wo = out_spatial
    fused_bias = node.attrs.get(FUSED_BIAS)
    if fused_bias is not None:
        extra = np.broadcast_to(np.asarray(fused_bias, dtype=np.float64).reshape(-1), (cout,))
        bias = extra if bias is None else bias + extra
    act_i, act_f = activation_epilogue(node.attrs.get(FUSED_ACTIVATION))
    # A fused residual Add: passes.py appends the other operand as a 4th input.
    residual = lw.input(node, 3) if node.attrs.get(FUSED_RESIDUAL) else -1
    ints = [cin, h, wd, cout, ho, wo, kh, kw, sh, sw, dh, dw, pt, pl, group, *act_i]
    bias_tensor = -1
    if bias is not None:
        bias_tensor = lw.const(bias.astype(np.float32).reshape(cout), f"{node.name}.bias")
    cin_g, cout_g = cin // group, cout // group
    hp, wp = (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + (kw - 1) * dw + 1
    if group == cin and cin_g == 1 and group > 1:
        lw.scratch(fixed=(hp * wp + 8) * 4 + 64)
        weights = lw.const(w.astype(np.float32).reshape(cout, kh * kw), f"{node.name}.weights")
        lw.emit(CONV_DW, [lw.input(node, 0), weights, bias_tensor, residual], [lw.output(node, 0)], ints, act_f)
        return
    k = cin_g * kh * kw
    wm = w.astype(np.float32).reshape(group, cout_g, k)
    packed = np.concatenate([pack_a(wm[g]).reshape(-1) for g in range(group)])
    weights = lw.const(packed, f"{node.name}.packed_W")
    # ea_gemm's work buffer, and the zero-padded input im2col reads.
    lw.scratch(fixed=work_bytes(ho * wo) + cin_g * hp * wp * 4 + 128)
    lw.emit(CONV, [lw.input(node, 0), weights, bias_tensor, residual], [lw.output(node, 0)], ints, act_f)
