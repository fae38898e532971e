"""Family "shape" (native/onnx/ops_shape.c): data movement.

Transpose, Concat, Split, Slice, Gather, Pad, Resize/Upsample, Expand, Tile,
DepthToSpace and SpaceToDepth. The kernels copy elements by their size, so
every supported dtype works; only Resize's linear mode computes (float32).

Most of these ops are one kernel, ``axmap``: out[i0, .., ik] = in[m0(i0), ..,
mk(ik)], with one index map per axis computed here at build time (a Slice's
range, a Pad's reflection, a Tile's modulo, a Resize's nearest pixel); a map
entry of -1 reads the fill value (Pad's constant). Axis 0 of a batched tensor
has no stored map: its length is only known at run time, so it is either the
identity or a broadcast, and an op that would have to move data across the
batch axis is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.convert.ir import Node, Value
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["shape"]
TRANSPOSE = BASE + 0
CONCAT = BASE + 1
SPLIT = BASE + 2
AXMAP = BASE + 3
GATHER = BASE + 4
LINEAR = BASE + 5
OPCODES = {
    "transpose": TRANSPOSE,
    "concat": CONCAT,
    "split": SPLIT,
    "axmap": AXMAP,
    "gather": GATHER,
    "linear": LINEAR,
}

MODE_IDENTITY = -1
MODE_BROADCAST = -2

# An axis map: None for the identity, "broadcast" for index 0 everywhere, else the input index
# of each output position (-1: the fill value).
AxisMap = np.ndarray | str | None


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise Unsupported(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _ints(array: np.ndarray | Sequence[int] | None) -> list[int]:
    if array is None:
        return []
    return [int(v) for v in np.asarray(array).reshape(-1)]


def _data_value(node: Node, lw: Lowerer, index: int = 0) -> Value:
    value = lw.value(node.inputs[index])
    if value.batch_valued:
        raise Unsupported(f"input {index} ({value.name!r}) is computed from the batch size and used as data")
    return value


def _batched_axis0(value: Value) -> bool:
    return value.batched and len(value.shape) > 0


# -- axmap ------------------------------------------------------------------


def _emit_axmap(
    node: Node, lw: Lowerer, maps: Sequence[AxisMap], fill: np.ndarray | None = None, out_index: int = 0
) -> None:
    """One ``axmap`` op writing output ``out_index`` of ``node`` from input 0 through ``maps`` (one per output axis)."""
    x = lw.value(node.inputs[0])
    out = lw.value(node.outputs[out_index])
    if len(maps) != len(out.shape):
        raise AssertionError("one map per output axis")
    for axis, m in enumerate(maps):
        if isinstance(m, np.ndarray) and len(m) != out.shape[axis]:
            raise AssertionError(f"map of axis {axis} has {len(m)} entries for extent {out.shape[axis]}")
    if _batched_axis0(out) and isinstance(maps[0], np.ndarray):
        raise Unsupported("would move data across the batch axis")
    if all(m is None for m in maps) and tuple(x.shape) == tuple(out.shape) and x.batched == out.batched:
        lw.alias(node, out_index, 0)
        return
    modes: list[int] = []
    pieces: list[np.ndarray] = []
    offset = 0
    for m in maps:
        if m is None:
            modes.append(MODE_IDENTITY)
        elif isinstance(m, str):
            modes.append(MODE_BROADCAST)
        else:
            modes.append(offset)
            pieces.append(np.asarray(m, dtype=np.int32))
            offset += len(m)
    inputs = [lw.input(node, 0)]
    if pieces:
        inputs.append(lw.const(np.concatenate(pieces), f"{node.name}.maps"))
    elif fill is not None:
        inputs.append(-1)
    if fill is not None:
        inputs.append(lw.const(np.asarray(fill, dtype=out.dtype).reshape(1), f"{node.name}.fill"))
    lw.emit(AXMAP, inputs, [lw.output(node, out_index)], ints=modes)


def _identity_map(m: AxisMap, extent_in: int) -> bool:
    if m is None:
        return True
    return isinstance(m, np.ndarray) and len(m) == extent_in and bool(np.array_equal(m, np.arange(extent_in)))


def _simplify(maps: list[AxisMap], x: Value) -> list[AxisMap]:
    """Stored maps that are the identity become None (cheaper, and an unchanged tensor becomes an alias)."""
    out: list[AxisMap] = []
    pad = len(maps) - len(x.shape)
    for axis, m in enumerate(maps):
        extent = x.shape[axis - pad] if axis >= pad else 1
        if isinstance(m, np.ndarray) and axis >= pad and _identity_map(m, extent):
            out.append(None)
        else:
            out.append(m)
    return out


# -- Transpose, DepthToSpace, SpaceToDepth ----------------------------------


def _emit_transpose(node: Node, lw: Lowerer, view: Sequence[int], perm: Sequence[int]) -> None:
    x = lw.value(node.inputs[0])
    if _batched_axis0(x) and perm and perm[0] != 0:
        raise Unsupported("moves the batch axis (axis 0) of a batched input")
    # Only size-1 axes move: the bytes stay in order (a reshape).
    big = [a for a in perm if view[a] != 1 or (a == 0 and _batched_axis0(x))]
    if big == sorted(big):
        lw.alias(node, 0, 0)
        return
    dims = [int(d) for d in view]
    if dims:
        dims[0] = -1  # follows the batch at run time
    lw.emit(TRANSPOSE, [lw.input(node, 0)], [lw.output(node, 0)], ints=[len(perm), *perm, *dims])


@lowering("Transpose")
def lower_transpose(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    rank = len(x.shape)
    perm = node.attr("perm")
    perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(rank)):
        raise Unsupported(f"perm {perm} is not a permutation of the {rank} axes")
    _emit_transpose(node, lw, x.shape, perm)


@lowering("DepthToSpace", "SpaceToDepth")
def lower_depth_space(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    if len(x.shape) != 4:
        raise Unsupported(f"input has rank {len(x.shape)}; {node.op_type} takes a 4-D tensor")
    b = int(node.attr("blocksize", 0))
    n, c, h, w = x.shape
    if b < 1:
        raise Unsupported(f"blocksize {b} must be positive")
    if node.op_type == "DepthToSpace":
        if c % (b * b):
            raise Unsupported(f"channels {c} are not a multiple of blocksize^2 ({b * b})")
        mode = node.attr("mode", "DCR")
        if mode == "DCR":
            view, perm = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)
        elif mode == "CRD":
            view, perm = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
        else:
            raise Unsupported(f"mode {mode!r} is not supported (DCR, CRD)")
    else:
        if h % b or w % b:
            raise Unsupported(f"spatial size {h}x{w} is not a multiple of blocksize {b}")
        mode = node.attr("mode", "DCR")  # the attribute came with opset 28; DCR is the older behaviour
        view = (n, c, h // b, b, w // b, b)
        if mode == "DCR":
            perm = (0, 3, 5, 1, 2, 4)
        elif mode == "CRD":
            perm = (0, 1, 3, 5, 2, 4)
        else:
            raise Unsupported(f"mode {mode!r} is not supported (DCR, CRD)")
    _emit_transpose(node, lw, view, perm)


# -- Concat, Split ----------------------------------------------------------


@lowering("Concat")
def lower_concat(node: Node, lw: Lowerer) -> None:
    out = lw.value(node.outputs[0])
    rank = len(out.shape)
    if rank == 0:
        raise Unsupported("concatenates scalars")
    axis = _axis(int(node.attr("axis", 0)), rank)
    names = [i for i in node.inputs if i]
    if not names:
        raise Unsupported("has no inputs")
    values = [lw.value(name) for name in names]
    if out.batched:
        if axis == 0:
            raise Unsupported("concatenates along the batch axis (axis 0) of batched inputs")
        if not all(v.batched for v in values):
            raise Unsupported("concatenates batched and unbatched tensors")
    inputs = [lw.input(node, i) for i, name in enumerate(node.inputs) if name]
    if len(inputs) == 1:
        lw.alias(node, 0, next(i for i, name in enumerate(node.inputs) if name))
        return
    lw.emit(CONCAT, inputs, [lw.output(node, 0)], ints=[axis])


@lowering("Split")
def lower_split(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    rank = len(x.shape)
    axis = _axis(int(node.attr("axis", 0)), rank)
    if node.opset >= 13 and lw.has_input(node, 1):
        split_value = lw.value(node.inputs[1])
        if split_value.const is None and not split_value.batch_valued:
            raise Unsupported("split sizes (input 1) are computed at run time; they must be known at build time")
    outs = [lw.value(o) for o in node.outputs if o]
    if len(outs) != len(node.outputs):
        raise Unsupported("an output is omitted")
    if _batched_axis0(x) and axis == 0:
        raise Unsupported("splits along the batch axis (axis 0) of a batched input")
    if sum(o.shape[axis] for o in outs) != x.shape[axis]:
        raise Unsupported(f"output sizes along axis {axis} do not add up to the input's {x.shape[axis]}")
    if len(outs) == 1:
        lw.alias(node, 0, 0)
        return
    lw.emit(SPLIT, [lw.input(node, 0)], [lw.output(node, i) for i in range(len(outs))], ints=[axis])


# -- Slice ----------------------------------------------------------------------


def _slice_range(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice clamping: (clamped start, clamped end) for one axis."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
    else:
        start = min(max(start, 0), dim - 1)
        end = min(max(end, -1), dim - 1)
    return start, end


@lowering("Slice")
def lower_slice(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    out = lw.value(node.outputs[0])
    rank = len(x.shape)
    ends_known = True
    if node.opset < 10:
        starts = _ints(node.attr("starts"))
        ends = _ints(node.attr("ends"))
        axes = _ints(node.attr("axes")) if node.attr("axes") is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts = _ints(lw.require_const(node, 1, "starts"))
        ends_value = lw.value(node.inputs[2]) if lw.has_input(node, 2) else None
        if ends_value is None:
            raise Unsupported("ends (input 2) is missing")
        if ends_value.const is not None:
            ends = _ints(ends_value.const)
        elif ends_value.batch_valued:
            ends_known = False
            ends = [0] * len(starts)
        else:
            raise Unsupported(f"ends (input 2, {ends_value.name!r}) must be known at build time, it is computed")
        axes_c = lw.const_input(node, 3)
        if lw.has_input(node, 3) and axes_c is None:
            raise Unsupported("axes (input 3) must be known at build time, it is computed")
        axes = _ints(axes_c) if axes_c is not None else list(range(len(starts)))
        steps_c = lw.const_input(node, 4)
        if lw.has_input(node, 4) and steps_c is None:
            raise Unsupported("steps (input 4) must be known at build time, it is computed")
        steps = _ints(steps_c) if steps_c is not None else [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise Unsupported("starts, ends, axes and steps differ in length")
    maps: list[AxisMap] = [None] * rank
    seen: set[int] = set()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, rank)
        if axis in seen:
            raise Unsupported(f"axis {axis} is sliced twice")
        seen.add(axis)
        if step == 0:
            raise Unsupported("a step is 0")
        dim = x.shape[axis]
        lo, hi = _slice_range(start, end, step, dim)
        if axis == 0 and _batched_axis0(x):
            # Only the full range is per row: [0, batch) with step 1.
            if not (step == 1 and lo == 0 and out.batched and out.shape[0] == x.shape[0]):
                raise Unsupported("slices the batch axis (axis 0) of a batched input; only the full range may be")
            continue
        if ends_known:
            indices = np.arange(lo, hi, step, dtype=np.int64)
        else:
            # ends depend on the batch size: the output's extent says how many (to the end, no further).
            count = out.shape[axis]
            indices = lo + step * np.arange(count, dtype=np.int64)
            to_end = np.arange(lo, dim if step > 0 else -1, step)
            if count != len(to_end):
                raise Unsupported("ends (input 2) depend on the batch size and cut a non-batch axis short")
        if len(indices) != out.shape[axis]:
            raise Unsupported(f"axis {axis}: {len(indices)} elements, the graph says {out.shape[axis]}")
        maps[axis] = indices
    maps = _simplify(maps, x)
    _emit_axmap(node, lw, maps)


# -- Gather ----------------------------------------------------------------------


@lowering("Gather")
def lower_gather(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    indices = _data_value(node, lw, 1)
    rank = len(x.shape)
    if rank == 0:
        raise Unsupported("gathers from a scalar")
    axis = _axis(int(node.attr("axis", 0)), rank)
    if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise Unsupported(f"indices have element type {indices.dtype}; int32 or int64 expected")
    if _batched_axis0(x):
        if axis == 0:
            raise Unsupported("gathers along the batch axis (axis 0) of a batched input")
        if indices.batched:
            raise Unsupported("both the data and the indices are batched")
    elif indices.batched and axis != 0:
        raise Unsupported("batched indices gather along an axis other than 0: the batch axis would not come first")
    if indices.const is not None:
        k = np.asarray(indices.const).astype(np.int64)
        bad = (k < -x.shape[axis]) | (k >= x.shape[axis])
        if bad.any():
            raise Unsupported(
                f"index {int(k[bad].reshape(-1)[0])} is out of range for axis {axis} of size {x.shape[axis]}"
            )
    count = int(np.prod(indices.shape, dtype=np.int64))
    if indices.batched:
        lw.scratch(per_batch=4 * count)
    else:
        lw.scratch(fixed=4 * count)
    lw.emit(GATHER, [lw.input(node, 0), lw.input(node, 1)], [lw.output(node, 0)], ints=[axis])


# -- Pad -------------------------------------------------------------------------


def _pad_map(dim: int, before: int, after: int, mode: str) -> np.ndarray:
    base = np.arange(dim, dtype=np.int64)
    b, a = max(before, 0), max(after, 0)
    if mode == "constant":
        mapped = np.concatenate([np.full(b, -1, np.int64), base, np.full(a, -1, np.int64)])
    else:
        if dim == 0 and (b or a):
            raise Unsupported(f"mode {mode!r} pads an empty axis")
        numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]
        if mode == "reflect" and dim == 1:
            mapped = np.zeros(dim + b + a, np.int64)
        else:
            mapped = np.pad(base, (b, a), mode=numpy_mode)  # type: ignore[call-overload]
    lo = -before if before < 0 else 0
    hi = len(mapped) + after if after < 0 else len(mapped)
    return mapped[lo:hi]


@lowering("Pad")
def lower_pad(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    rank = len(x.shape)
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap") or (mode == "wrap" and node.opset < 19):
        raise Unsupported(f"mode {mode!r} is not supported (constant, reflect, edge, wrap)")
    if node.opset < 11:
        pads = _ints(node.attr("pads", node.attr("paddings")))
        value = float(node.attr("value", 0.0))
        axes = list(range(rank))
    else:
        pads = _ints(lw.require_const(node, 1, "pads"))
        cval = lw.const_input(node, 2)
        if lw.has_input(node, 2) and cval is None:
            raise Unsupported("constant_value (input 2) must be known at build time, it is computed")
        value = np.asarray(cval).reshape(-1)[0] if cval is not None and np.asarray(cval).size else 0
        axes_c = lw.const_input(node, 3)
        if lw.has_input(node, 3) and axes_c is None:
            raise Unsupported("axes (input 3) must be known at build time, it is computed")
        axes = [_axis(a, rank) for a in _ints(axes_c)] if axes_c is not None else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise Unsupported(f"{len(pads)} pads for {len(axes)} axes")
    maps: list[AxisMap] = [None] * rank
    for i, axis in enumerate(axes):
        before, after = pads[i], pads[i + len(axes)]
        if before == 0 and after == 0:
            continue
        if axis == 0 and _batched_axis0(x):
            raise Unsupported("pads the batch axis (axis 0) of a batched input")
        maps[axis] = _pad_map(x.shape[axis], before, after, mode)
    fill = None
    if mode == "constant" and any(isinstance(m, np.ndarray) and (m < 0).any() for m in maps):
        fill = np.asarray(value).astype(x.dtype).reshape(1)
    _emit_axmap(node, lw, _simplify(maps, x), fill)


# -- Expand, Tile ------------------------------------------------------------------


@lowering("Expand")
def lower_expand(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    out = lw.value(node.outputs[0])
    shape_value = lw.value(node.inputs[1])
    if shape_value.const is None and not shape_value.batch_valued:
        raise Unsupported("shape (input 1) is computed at run time; it must be known at build time")
    rank = len(out.shape)
    pad = rank - len(x.shape)
    if pad < 0:
        raise Unsupported("output rank is lower than the input's")
    if x.batched and pad:
        raise Unsupported("expands a batched input to a higher rank: the batch axis would not come first")
    maps: list[AxisMap] = []
    for axis in range(rank):
        xd = x.shape[axis - pad] if axis >= pad else 1
        od = out.shape[axis]
        if axis == 0 and _batched_axis0(out):
            maps.append(None if x.batched else "broadcast")
            if not x.batched and xd != 1:
                raise Unsupported("expands a tensor with several rows to the batch")
            continue
        if xd == od:
            maps.append(None)
        elif xd == 1:
            maps.append("broadcast")
        else:
            raise Unsupported(f"cannot expand extent {xd} to {od} on axis {axis}")
    _emit_axmap(node, lw, maps)


@lowering("Tile")
def lower_tile(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    out = lw.value(node.outputs[0])
    repeats = _ints(lw.require_const(node, 1, "repeats"))
    rank = len(x.shape)
    if len(repeats) != rank:
        raise Unsupported(f"{len(repeats)} repeats for rank {rank}")
    maps: list[AxisMap] = [None] * rank
    for axis, r in enumerate(repeats):
        if r < 0:
            raise Unsupported(f"repeat {r} is negative")
        if r == 1:
            continue
        if axis == 0 and _batched_axis0(x):
            raise Unsupported("tiles the batch axis (axis 0) of a batched input")
        dim = x.shape[axis]
        maps[axis] = np.tile(np.arange(dim, dtype=np.int64), r)
        if len(maps[axis]) != out.shape[axis]:  # type: ignore[arg-type]
            raise Unsupported(f"axis {axis}: {dim} x {r} != {out.shape[axis]}")
    _emit_axmap(node, lw, maps)


# -- Resize, Upsample ------------------------------------------------------------

COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "asymmetric",
    "align_corners",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
)
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
F32 = np.float32


def _original_coordinates(mode: str, out_len: int, in_len: int, scale: np.float32) -> np.ndarray:
    """onnxruntime's coordinate transform, in its float32 arithmetic."""
    x = np.arange(out_len, dtype=F32)
    half = F32(0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "asymmetric":
            return x / scale
        if mode == "pytorch_half_pixel":
            return (x + half) / scale - half if out_len > 1 else np.zeros(out_len, F32)
        if mode == "tf_half_pixel_for_nn":
            return (x + half) / scale
        if mode == "align_corners":
            if out_len == 1:
                return np.zeros(out_len, F32)
            return x * F32(in_len - 1) / F32(out_len - 1)
        if mode == "half_pixel_symmetric":
            output_width = F32(scale * F32(in_len))
            adjustment = F32(F32(out_len) / output_width)
            center = F32(F32(in_len) / F32(2))
            offset = F32(center * (F32(1) - adjustment))
            return (np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(scale) - 0.5).astype(F32)
        return (x + half) / scale - half  # half_pixel


def _nearest(coords: np.ndarray, mode: str, downsample: bool, snap: bool = False) -> np.ndarray:
    c = coords.astype(F32)
    if snap:
        # onnxruntime's asymmetric and tf_half_pixel_for_nn coordinates land exactly on the halves
        # and integers that the exact arithmetic gives (x * in / out), where float32 division can
        # miss by an ulp (2 / float32(4/7) = 3.4999998): snap such near misses.
        grid = (np.floor(c.astype(np.float64) * 2 + 0.5) / 2).astype(F32)
        c = np.where(np.abs(c - grid) <= 2 * np.spacing(np.abs(c)), grid, c).astype(F32)
    if mode == "simple":  # Resize-10 and Upsample
        return np.ceil(c).astype(np.int64) if downsample else np.trunc(c).astype(np.int64)
    if mode == "round_prefer_ceil":
        return np.where(c >= 0, np.floor(c + F32(0.5)), np.ceil(c - F32(0.5))).astype(np.int64)  # std::round
    if mode == "floor":
        return np.floor(c).astype(np.int64)
    if mode == "ceil":
        return np.ceil(c).astype(np.int64)
    # round_prefer_floor: halfway cases go down
    halfway = c == (np.trunc(c) + F32(0.5))
    rounded = np.where(c >= 0, np.floor(c + F32(0.5)), np.ceil(c - F32(0.5)))
    return np.where(halfway, np.floor(c), rounded).astype(np.int64)


def _linear_table(coords: np.ndarray, in_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(i0, i1) and (w0, w1) per output position, as onnxruntime computes them."""
    c = np.clip(coords.astype(F32), F32(0), F32(in_len - 1))
    i1 = np.minimum(c.astype(np.int64), in_len - 1)
    i2 = np.minimum(i1 + 1, in_len - 1)
    d1 = np.abs(c - i1.astype(F32)).astype(F32)
    d2 = np.abs(c - i2.astype(F32)).astype(F32)
    same = i1 == i2
    d1 = np.where(same, F32(0.5), d1).astype(F32)
    d2 = np.where(same, F32(0.5), d2).astype(F32)
    idx = np.stack([i1, i2], axis=1).astype(np.int32).reshape(-1)
    weights = np.stack([d2, d1], axis=1).astype(F32).reshape(-1)  # the nearer index weighs more
    return idx, weights


def _resize_scales(node: Node, lw: Lowerer, x: Value, out: Value) -> tuple[list[np.float32], bool]:
    """Per-axis float32 scales (as onnxruntime uses them) and whether they came from sizes."""
    rank = len(x.shape)
    resize = node.op_type == "Resize"
    if not resize:
        if node.opset < 9:
            scales_attr = node.attr("scales")
            if scales_attr is None:
                raise Unsupported("scales attribute is missing")
            return [F32(s) for s in scales_attr], False
        return [F32(s) for s in np.asarray(lw.require_const(node, 1, "scales")).reshape(-1)], False
    if node.opset < 11:
        return [F32(s) for s in np.asarray(lw.require_const(node, 1, "scales")).reshape(-1)], False
    axes = list(range(rank))
    if node.opset >= 18 and node.attr("axes") is not None:
        axes = [_axis(int(a), rank) for a in node.attr("axes")]
    policy = node.attr("keep_aspect_ratio_policy", "stretch") if node.opset >= 18 else "stretch"
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise Unsupported(f"keep_aspect_ratio_policy {policy!r} is not supported")
    scales_value = lw.value(node.inputs[2]) if lw.has_input(node, 2) else None
    sizes_value = lw.value(node.inputs[3]) if lw.has_input(node, 3) else None
    if scales_value is not None and not (scales_value.const is not None and scales_value.const.size == 0):
        if scales_value.const is None:
            raise Unsupported("scales (input 2) must be known at build time, it is computed")
        given = [F32(s) for s in np.asarray(scales_value.const).reshape(-1)]
        if len(given) != len(axes):
            raise Unsupported(f"{len(given)} scales for {len(axes)} axes")
        scales = [F32(1)] * rank
        for a, s in zip(axes, given, strict=True):
            scales[a] = s
        return scales, False
    if sizes_value is None:
        raise Unsupported("neither scales nor sizes is given")
    if sizes_value.const is not None:
        sizes = _ints(sizes_value.const)
        if len(sizes) != len(axes):
            raise Unsupported(f"{len(sizes)} sizes for {len(axes)} axes")
    elif sizes_value.batch_valued:
        if policy != "stretch":
            raise Unsupported("sizes (input 3) depend on the batch size and keep_aspect_ratio_policy is not stretch")
        sizes = [out.shape[a] for a in axes]
    else:
        raise Unsupported("sizes (input 3) must be known at build time, it is computed")
    scales = [F32(1)] * rank
    for a, size in zip(axes, sizes, strict=True):
        scales[a] = F32(1) if x.shape[a] == 0 else F32(F32(size) / F32(x.shape[a]))
    if policy != "stretch":
        chosen = [scales[a] for a in axes]
        common = min(chosen) if policy == "not_larger" else max(chosen)
        for a in axes:
            scales[a] = common
    return scales, True


@lowering("Resize", "Upsample")
def lower_resize(node: Node, lw: Lowerer) -> None:
    x = _data_value(node, lw)
    out = lw.value(node.outputs[0])
    rank = len(x.shape)
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise Unsupported(f"mode {mode!r} is not supported (nearest, linear)")
    legacy = node.op_type == "Upsample" or node.opset < 11
    coord_mode = "asymmetric" if legacy else node.attr("coordinate_transformation_mode", "half_pixel")
    if coord_mode not in COORDINATE_MODES or (coord_mode == "half_pixel_symmetric" and node.opset < 19):
        raise Unsupported(f"coordinate_transformation_mode {coord_mode!r} is not supported")
    nearest_mode = "simple" if legacy else node.attr("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest_mode not in (*NEAREST_MODES, "simple"):
        raise Unsupported(f"nearest_mode {nearest_mode!r} is not supported")
    if int(node.attr("antialias", 0)):
        raise Unsupported("antialias=1 is not supported")
    if int(node.attr("exclude_outside", 0)):
        raise Unsupported("exclude_outside=1 is not supported")
    if mode == "linear" and x.dtype != np.float32:
        raise Unsupported(f"linear mode on {x.dtype} is not supported (float32 only)")
    scales, _ = _resize_scales(node, lw, x, out)
    if len(scales) != rank:
        raise Unsupported(f"{len(scales)} scales for rank {rank}")
    per_axis: list[tuple[int, np.ndarray] | None] = []  # (axis, coordinates) for axes that change
    for axis in range(rank):
        in_len, out_len = x.shape[axis], out.shape[axis]
        if axis == 0 and _batched_axis0(x):
            if scales[axis] != 1 or not out.batched or out_len != in_len:
                raise Unsupported("resizes the batch axis (axis 0) of a batched input")
            per_axis.append(None)
            continue
        if scales[axis] == F32(1) and in_len == out_len:
            per_axis.append(None)  # onnxruntime leaves an axis of scale 1 alone
            continue
        if in_len == 0:
            raise Unsupported(f"axis {axis} is empty")
        if scales[axis] <= 0:
            raise Unsupported(f"scale {scales[axis]} on axis {axis} is not positive")
        per_axis.append((axis, _original_coordinates(coord_mode, out_len, in_len, scales[axis])))
    if mode == "nearest":
        maps: list[AxisMap] = []
        for axis, entry in enumerate(per_axis):
            if entry is None:
                maps.append(None)
                continue
            snap = coord_mode in ("asymmetric", "tf_half_pixel_for_nn") and not legacy
            pixels = _nearest(entry[1], nearest_mode, bool(scales[axis] < 1), snap)
            maps.append(np.clip(pixels, 0, x.shape[axis] - 1))
        _emit_axmap(node, lw, _simplify(maps, x))
        return
    changed = [e for e in per_axis if e is not None]
    if not changed:
        lw.alias(node, 0, 0)
        return
    # Separable: one pass per axis, shrinking axes first (less data for the others).
    changed.sort(key=lambda e: (out.shape[e[0]] / max(x.shape[e[0]], 1), -e[0]))
    current = lw.input(node, 0)
    shape = list(x.shape)
    for n, (axis, coords) in enumerate(changed):
        idx, weights = _linear_table(coords, x.shape[axis])
        shape[axis] = out.shape[axis]
        last = n == len(changed) - 1
        target = lw.output(node, 0) if last else lw.temp(np.float32, shape, out.batched, f"{node.name}.pass{n}")
        tables = [lw.const(idx, f"{node.name}.idx{axis}"), lw.const(weights, f"{node.name}.w{axis}")]
        lw.emit(LINEAR, [current, *tables], [target], ints=[axis])
        current = target
