"""Running a 2D network on a 3D volume slice by slice, inside the network.

MONAI's ``SliceInferer`` does this outside the network, with a fixed in-plane window (``roi_size``) and sliding
windows; a network that takes the volume itself (``(B, C, X, Y, Z)`` in, ``(B, out, X, Y, Z)`` out) can instead
be served with ``SimpleInferer``, verified and exported with the volume's shape, and reported as 3D by MONAI Label.
The mechanics are network-independent:

1. :func:`volume_to_slices`: move the slice axis into the batch, ``(B, C, X, Y, Z) -> (B * Z, C, X, Y)`` for
   ``slice_axis=2`` (slices ordered batch item first), and zero-pad each slice to the next multiple of the
   network's ``divisor`` (e.g. 32 for a PVTv2 or any 5-level encoder), centred as MONAI's sliding-window padding
   (the smaller half before, the larger after);
2. run the 2D network on the slices in chunks of at most ``slice_batch`` slices (bounds the memory of a whole
   volume: activations of ``slice_batch`` slices at a time);
3. :func:`slices_to_volume`: crop the padding off and move the slices back, ``(B * Z, out, X, Y) ->
   (B, out, X, Y, Z)``.

:func:`slicewise` composes the three for any 2D callable (eager mode). The functions are TorchScript-compatible so
that a scripted network can use them in its own ``forward`` (see :class:`medseg_nets.nets.emcad.EMCADNet`,
``slice_axis``), which keeps the network's ``state_dict`` keys unchanged (no wrapper module).
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["volume_to_slices", "slices_to_volume", "padding_to_multiple", "slicewise", "cat_chunks"]


def _check_axis(slice_axis: int) -> int:
    if slice_axis < 0 or slice_axis > 2:
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of a 3D volume), got {slice_axis}.")
    return slice_axis


def padding_to_multiple(height: int, width: int, divisor: int) -> List[int]:
    """``F.pad`` widths ``[left, right, top, bottom]`` that zero-pad a ``height x width`` plane to the next
    multiples of ``divisor``, centred (the smaller half first, as MONAI's ``SlidingWindowInferer`` pads)."""
    if divisor < 1:
        raise ValueError(f"divisor must be positive, got {divisor}.")
    dh = (divisor - height % divisor) % divisor
    dw = (divisor - width % divisor) % divisor
    return [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2]


def volume_to_slices(x: torch.Tensor, slice_axis: int, divisor: int = 1) -> Tuple[torch.Tensor, List[int]]:
    """``(B, C, S0, S1, S2)`` -> ``(B * S[slice_axis], C, H, W)`` slices (the two other spatial axes in their order),
    each zero-padded to multiples of ``divisor``; returns the slices and the padding (``F.pad`` order) for
    :func:`slices_to_volume`."""
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) volume, got a tensor of shape {list(x.shape)}.")
    dim = _check_axis(slice_axis) + 2
    slices = x.movedim(dim, 1)  # (B, S, C, H, W)
    slices = slices.reshape(slices.shape[0] * slices.shape[1], slices.shape[2], slices.shape[3], slices.shape[4])
    pad = padding_to_multiple(slices.shape[2], slices.shape[3], divisor)
    if pad[0] + pad[1] + pad[2] + pad[3] > 0:
        slices = F.pad(slices, pad)
    return slices, pad


def slices_to_volume(y: torch.Tensor, batch_size: int, slice_axis: int, pad: List[int]) -> torch.Tensor:
    """The inverse of :func:`volume_to_slices` for the network's output: crop ``pad`` off the ``(B * S, K, H, W)``
    slices and stack them back into ``(B, K, ...)`` with the slices along ``slice_axis``."""
    dim = _check_axis(slice_axis) + 2
    h, w = y.shape[2] - pad[2] - pad[3], y.shape[3] - pad[0] - pad[1]
    y = y[:, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
    y = y.reshape(batch_size, y.shape[0] // batch_size, y.shape[1], h, w)
    return y.movedim(1, dim)


def slicewise(
    network: Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]],
    x: torch.Tensor,
    slice_axis: int = 2,
    slice_batch: int = 32,
    divisor: int = 1,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Apply a 2D ``network`` to every slice of the ``(B, C, X, Y, Z)`` volume ``x`` along ``slice_axis``.

    The slices are zero-padded to multiples of ``divisor``, run ``slice_batch`` at a time (``slice_batch < 1``: all
    at once), cropped back and stacked into ``(B, out, X, Y, Z)``. A network that returns a list or tuple of maps
    (e.g. deep-supervision heads) gives a list of volumes.
    """
    b = x.shape[0]
    slices, pad = volume_to_slices(x, slice_axis, divisor)
    chunks = [slices] if slice_batch < 1 else torch.split(slices, slice_batch)
    outs = [network(chunk) for chunk in chunks]
    single = isinstance(outs[0], torch.Tensor)
    heads = cat_chunks([[o] if single else list(o) for o in outs])
    volumes = [slices_to_volume(h, b, slice_axis, pad) for h in heads]
    return volumes[0] if single else volumes


def cat_chunks(chunks: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    """The outputs of a network run chunk by chunk (``chunks[k][i]``: output ``i`` of chunk ``k``), each output's
    chunks concatenated along the batch axis (one chunk: its outputs as they are). TorchScript-compatible, for
    networks that chunk their own forward (:class:`~medseg_nets.nets.emcad.EMCADNet`)."""
    if len(chunks) == 1:
        return chunks[0]
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
