"""Memory traffic and roofline of one forward (``--cases``): how far a network's own op sequence is from the machine.

:class:`TrafficMode` (a ``TorchDispatchMode``) records, for every ATen op one forward runs, an :class:`OpRecord`:

- FLOPs: ``torch.utils.flop_counter``'s formulas (``flop_registry``), called as ``FlopCounterMode`` calls them; ops
  that are not in the registry and have a composite (``CompositeImplicitAutograd``) kernel are decomposed, as
  ``FlopCounterMode`` does, so the ops recorded are the kernels eager PyTorch runs (``conv3d`` is recorded as the
  ``convolution`` it calls, ``group_norm`` as ``native_group_norm``, ``contiguous`` as ``clone`` or nothing);
- bytes read: the tensors among the op's inputs, each distinct storage counted once per op (the distinct views of
  one storage summed, at most the storage's size); the output buffer of an ``out=`` op and the destination of an
  op that overwrites its argument without reading it (``copy_``, ``fill_``, ``zero_``, ...) are not read;
- bytes written: the op's outputs, the same way (an in-place or ``out=`` op writes the tensor it returns);
- nothing for ops whose outputs alias an input without writing it (views: ``view``, ``permute``, ``expand``,
  ``slice``, ``select``, ``t``, ``transpose``, ``detach``, ``alias``, ...) or that allocate without writing
  (``empty``, ``empty_strided``, ``new_empty``, ``resize_``, ...).

A tensor's bytes are its elements x element size, at most its storage's size (an expanded view reads its small
storage). The bytes are those each kernel must move at least once to or from memory; caches can make a kernel move
less (small tensors, weights read again), copies and temporaries inside a kernel make it move more.

:func:`roofline` puts the records against the machine's peaks (:mod:`bench.peaks`): an op takes at least
``max(flops / compute peak, bytes / memory peak)``, with the *conv peak* (best dense ``Conv3d``) for convolutions,
the *matmul peak* for matrix products and attention (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``sdpa``) and the
higher of the two for any other op that counts FLOPs; the sum over the ops is the roofline time of the sequence: the
time this op sequence would take if every kernel ran at the machine's peak, one after the other. The share of it
spent in ops whose memory time exceeds their compute time is the "memory-bound share".

The bytes each op reads from the model's parameters and buffers are kept apart (``param_bytes_read``): a batch of
``B`` inputs reads them once per op, not ``B`` times, so :func:`roofline` with ``batch=B`` gives the roofline of one
input of such a batch (what a sliding window with ``sw_batch_size`` B costs per window): activations and FLOPs as
recorded, parameter bytes divided by ``B``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from medseg_nets import native

aten = torch.ops.aten

#: ops that allocate (or re-point) storage without writing values: 0 bytes
ALLOCATING = frozenset({aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
                        aten.resize_, aten.set_, aten.lift_fresh})
#: in-place ops that overwrite their first argument without reading it (written, not read)
OVERWRITING = frozenset({aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.random_,
                         aten.bernoulli_, aten.exponential_})
#: ops run at the conv peak and at the matmul peak (:func:`roofline`)
CONV_OPS = frozenset({aten.convolution, aten._convolution, aten.convolution_overrideable, aten._slow_conv2d_forward,
                      aten.mkldnn_convolution, aten.cudnn_convolution})
MATMUL_OPS = frozenset({aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._scaled_mm,
                        aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
                        aten._scaled_dot_product_flash_attention_for_cpu,
                        aten._scaled_dot_product_cudnn_attention})
#: metadata queries (no kernel): not recorded
_METADATA = frozenset({aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.size,
                       aten.stride, aten.numel, aten.dim, aten.storage_offset, aten.is_contiguous,
                       aten.sym_is_contiguous, aten.is_strides_like_format, aten.is_non_overlapping_and_dense})


@dataclass
class OpRecord:
    """One ATen op call: name (``aten.copy_.default``), kind (``conv``, ``matmul``, ``other``), FLOPs (multiply-add
    = 2), bytes read and written, and of the bytes read those of the model's parameters and buffers."""

    op: str
    kind: str
    flops: int
    bytes_read: int
    bytes_written: int
    param_bytes_read: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in ``t``: elements x element size, at most the storage's size (expanded views)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each storage once: the distinct views of one storage (offset, shape, strides) summed,
    at most that storage's size."""
    views: dict[int, dict[tuple, int]] = defaultdict(dict)
    sizes: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = _storage_key(t)
        sizes[key] = t.untyped_storage().nbytes()
        views[key][(t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)] = tensor_bytes(t)
    return sum(min(sum(v.values()), sizes[k]) for k, v in views.items())


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def is_view_op(func: torch._ops.OpOverload) -> bool:
    """Whether an output of ``func`` aliases an input without the op writing it (a view, by its schema)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _storage_key(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    return storage.data_ptr() or id(storage)


def aliases_inputs(ins: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> bool:
    """Whether every output shares its storage with an input (a view the schema does not declare, e.g.
    ``_unsafe_view``, or an op that returned its input)."""
    keys = {_storage_key(t) for t in ins}
    return bool(outs) and all(_storage_key(t) in keys for t in outs)


def op_kind(packet: Any) -> str:
    return "conv" if packet in CONV_OPS else ("matmul" if packet in MATMUL_OPS else "other")


def op_traffic(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], out: Any,
               param_storages: frozenset = frozenset()) -> tuple[int, int, int]:
    """(bytes read, bytes written, bytes read from ``param_storages``) of one call of ``func`` (module docstring's
    rules); ``param_storages``: the storage keys of the model's parameters and buffers."""
    packet = func._overloadpacket
    if packet in ALLOCATING or is_view_op(func):
        return 0, 0, 0
    schema = func._schema
    writes, not_read = False, []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        writes = True
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        if arg.is_out or (i == 0 and packet in OVERWRITING):
            not_read += _tensors(value)
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    if not writes and aliases_inputs(ins, outs):
        return 0, 0, 0
    skip = {id(t) for t in not_read}
    read = [t for t in ins if id(t) not in skip]
    params = distinct_bytes(t for t in read if _storage_key(t) in param_storages) if param_storages else 0
    return distinct_bytes(read), distinct_bytes(outs), params


class TrafficMode(TorchDispatchMode):
    """Records an :class:`OpRecord` per ATen op run inside it (``records``); see the module docstring. ``params``:
    the model's parameters and buffers (their bytes read are kept apart)."""

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry
        self.param_storages = frozenset(_storage_key(p) for p in params if p.numel())
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in _METADATA:
            return func(*args, **kwargs)
        if func not in self.flop_registry and packet not in self.flop_registry:
            with self:  # as FlopCounterMode: a composite op runs (and is recorded) as the ops it is made of
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        flops = 0
        if packet in self.flop_registry:
            flops = int(self.flop_registry[packet](*args, **kwargs, out_val=out))
        read, written, params = op_traffic(func, args, kwargs, out, self.param_storages)
        self.records.append(OpRecord(str(func), op_kind(packet), flops, read, written, params))
        return out


def record_forward(fn: Callable[..., Any], *args: Any, params: Iterable[torch.Tensor] = ()) -> list[OpRecord]:
    """The op records of one call ``fn(*args)`` (run it under ``torch.inference_mode`` for a forward); ``params``:
    the model's parameters and buffers. The fused C kernels of :mod:`medseg_nets.native` run as they do outside
    the recorder and are recorded from what they report (``native.<kernel>``, kind ``conv`` for the depth-wise
    convolution), so the records are the op sequence the network really runs."""
    mode = TrafficMode(params)
    mode.sees_native_kernels = True  # medseg_nets.blocks.depthwise.use_native_kernels: keep the kernels on

    def observe(call: native.KernelCall) -> None:
        kind = "conv" if call.name == "depthwise3d" else "other"
        mode.records.append(OpRecord(f"native.{call.name}", kind, call.flops, call.bytes_read, call.bytes_written,
                                     call.param_bytes_read))

    native.add_observer(observe)
    try:
        with mode:
            fn(*args)
    finally:
        native.remove_observer(observe)
    return mode.records


def op_bytes(rec: OpRecord, batch: int = 1) -> float:
    """Bytes of one op per input of a batch of ``batch``: parameter bytes read once per batch."""
    return rec.bytes - rec.param_bytes_read * (1 - 1 / max(1, batch))


def op_seconds(rec: OpRecord, peaks: dict[str, float], batch: int = 1) -> tuple[float, float]:
    """(compute seconds, memory seconds) of one op at ``peaks`` (``conv3d_gflops_per_s``, ``matmul_gflops_per_s``,
    ``memory_gb_per_s``): FLOPs at the peak of its kind (conv, matmul, else the higher), bytes (:func:`op_bytes`)
    at the memory peak."""
    if rec.kind == "conv":
        rate = peaks["conv3d_gflops_per_s"]
    elif rec.kind == "matmul":
        rate = peaks["matmul_gflops_per_s"]
    else:
        rate = max(peaks["conv3d_gflops_per_s"], peaks["matmul_gflops_per_s"])
    return rec.flops / (rate * 1e9), op_bytes(rec, batch) / (peaks["memory_gb_per_s"] * 1e9)


def roofline(records: Sequence[OpRecord], peaks: dict[str, float], top: int = 8, batch: int = 1) -> dict[str, Any]:
    """Summary of an op sequence at the machine's ``peaks``: GFLOPs, GB read / written / moved (as recorded; of the
    GB read, those of parameters), the roofline seconds (sum over the ops of max(compute, memory) seconds; with
    ``batch``, per input of a batch of that many, :func:`op_bytes`), its memory-bound share (the part of it in ops
    whose memory time exceeds their compute time), the compute-only and memory-only sums, and the ``top`` ops by
    bytes (op, calls, GB, GFLOPs, roofline seconds, share of the roofline)."""
    total = mem_bound = compute_s = memory_s = 0.0
    by_op: dict[str, dict[str, Any]] = {}
    for rec in records:
        c, m = op_seconds(rec, peaks, batch)
        t = max(c, m)
        total += t
        compute_s += c
        memory_s += m
        if m > c:
            mem_bound += t
        agg = by_op.setdefault(rec.op, dict(op=rec.op, calls=0, gb=0.0, gflops=0.0, roofline_s=0.0))
        agg["calls"] += 1
        agg["gb"] += rec.bytes / 1e9
        agg["gflops"] += rec.flops / 1e9
        agg["roofline_s"] += t
    ops = sorted(by_op.values(), key=lambda a: -a["gb"])[:top]
    for agg in ops:
        agg["roofline_share"] = agg["roofline_s"] / total if total else None
    return dict(ops=len(records), gflops=sum(r.flops for r in records) / 1e9,
                gb_read=sum(r.bytes_read for r in records) / 1e9,
                gb_written=sum(r.bytes_written for r in records) / 1e9,
                gb_moved=sum(r.bytes for r in records) / 1e9,
                param_gb_read=sum(r.param_bytes_read for r in records) / 1e9, batch=batch, roofline_s=total,
                compute_s=compute_s,
                memory_s=memory_s, memory_bound_share=mem_bound / total if total else None, top_ops=ops,
                peaks={k: peaks[k] for k in ("conv3d_gflops_per_s", "matmul_gflops_per_s", "memory_gb_per_s")})


def forward_roofline(model: torch.nn.Module, x: torch.Tensor, peaks: Optional[dict[str, float]], top: int = 8,
                     batch: int = 1) -> dict[str, Any]:
    """One forward of ``model`` on ``x`` under ``torch.inference_mode`` recorded (:func:`record_forward`) and
    summarised (:func:`roofline`; without ``peaks`` only the counts, no seconds), with ``sw_batch`` (``batch``) and
    ``sw_batch_roofline_s``: the roofline per input of a batch of ``batch`` such inputs (parameters read once)."""
    params = [*model.parameters(), *model.buffers()]
    with torch.inference_mode():
        records = record_forward(model, x, params=params)
    if peaks is None:
        return dict(ops=len(records), gflops=sum(r.flops for r in records) / 1e9,
                    gb_moved=sum(r.bytes for r in records) / 1e9)
    summary = roofline(records, peaks, top)
    summary["sw_batch"] = batch
    summary["sw_batch_roofline_s"] = roofline(records, peaks, 0, batch)["roofline_s"] if batch > 1 else \
        summary["roofline_s"]
    return summary


def records_as_dicts(records: Sequence[OpRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
