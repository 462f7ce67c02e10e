"""Key-mapping rules shared by the converters of :mod:`medseg_nets.convert`.

A :class:`Rule` maps one module of the authors' network to one module of ours: a template of the authors' module
path, a template of ours (both with ``{name}`` placeholders that match decimal indices) and the exact tensor names
that module may hold (``weight``, ``bias``, BatchNorm buffers, ...). A key no rule matches, or a tensor name a
rule does not list, is an :class:`AuthorsCheckpointError` naming the key; so is a key of our network that the
checkpoint does not provide (:func:`check_against`), named both ways. A tensor name mapped to :data:`DROP` is known
and deliberately not loaded (e.g. a buffer our network derives itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from medseg_nets.convert import AuthorsCheckpointError

__all__ = [
    "BN",
    "CONV",
    "CONV_NB",
    "DROP",
    "LINEAR",
    "NORM",
    "PRELU",
    "Rule",
    "apply_rules",
    "check_against",
    "error_list",
    "forward_key",
    "inverse_key",
    "renamed",
    "same_names",
]

CONV = ("weight", "bias")  #: convolution or linear with bias
CONV_NB = ("weight",)  #: convolution without bias
NORM = ("weight", "bias")  #: affine GroupNorm / LayerNorm
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  #: BatchNorm with its buffers
LINEAR = CONV
PRELU = ("weight",)  #: PReLU

#: target of a tensor name whose key is known and deliberately not loaded (a derived buffer)
DROP = None


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z_]+\})", template)
    regex = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex)


class Rule:
    """``authors`` module path -> ``ours`` module path, for the tensor names in ``tensors`` (a list of names kept
    as they are, or a mapping from the authors' tensor name to ours, or to :data:`DROP` for a key not loaded).

    ``transform(name, tensor)`` may change a tensor's layout (e.g. a 0-d scalar to shape ``(1,)``).
    """

    def __init__(
        self,
        authors: str,
        ours: str,
        tensors: Iterable[str] | Mapping[str, Optional[str]],
        transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.authors, self.ours = authors, ours
        # authors' tensor name -> ours
        self.tensors = dict(tensors) if isinstance(tensors, Mapping) else {t: t for t in tensors}
        self.transform = transform
        self._authors_re = _pattern(authors)
        self._ours_re = _pattern(ours)

    def forward(self, key: str) -> Optional[tuple[str, Optional[str]]]:
        """``(our module path, tensor name)`` for an authors' key this rule covers (tensor name :data:`DROP` for a
        key that is dropped), else None."""
        module, _, tensor = key.rpartition(".")
        m = self._authors_re.fullmatch(module)
        if m is None or tensor not in self.tensors:
            return None
        return self.ours.format(**m.groupdict()), self.tensors[tensor]

    def inverse(self, key: str) -> Optional[str]:
        """The authors' key that maps to our ``key``, or None."""
        module, _, tensor = key.rpartition(".")
        m = self._ours_re.fullmatch(module)
        names = [a for a, o in self.tensors.items() if o is not DROP and o == tensor]
        if m is None or not names:
            return None
        return f"{self.authors.format(**m.groupdict())}.{names[0]}"


Tensors = Union[Iterable[str], Mapping[str, Optional[str]]]


def renamed(authors: str, ours: str, modules: Mapping[str, tuple[str, Tensors]]) -> list[Rule]:
    """Rules for the modules under two prefixes: ``{authors}.{name}`` -> ``{ours}.{our_name}`` for each
    ``name: (our_name, tensors)`` of ``modules``."""
    return [Rule(f"{authors}.{name}", f"{ours}.{our}", tensors) for name, (our, tensors) in modules.items()]


def same_names(authors: str, ours: str, modules: Mapping[str, Tensors]) -> list[Rule]:
    """Rules for modules that keep their names under another prefix: ``{authors}.{name}`` -> ``{ours}.{name}``
    for each ``name: tensors`` of ``modules``."""
    return renamed(authors, ours, {name: (name, tensors) for name, tensors in modules.items()})


def forward_key(key: str, rules: Iterable[Rule]) -> Optional[tuple[Rule, str, Optional[str]]]:
    """``(rule, our module path, tensor name)`` from the first of ``rules`` that covers the authors' ``key``."""
    for rule in rules:
        hit = rule.forward(key)
        if hit is not None:
            return (rule, *hit)
    return None


def inverse_key(key: str, rules: Iterable[Rule]) -> Optional[str]:
    """The authors' key that the first fitting rule of ``rules`` maps to our ``key``, or None."""
    for rule in rules:
        name = rule.inverse(key)
        if name is not None:
            return name
    return None


def error_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_rules(
    state_dict: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
    network: str,
    hints: Optional[Mapping[str, str]] = None,
) -> dict[str, torch.Tensor]:
    """Map every key of ``state_dict`` through the first rule that covers it; unknown keys raise, dropped keys
    (:data:`DROP`) are left out.

    ``hints`` maps a regular expression of authors' keys to an explanation appended to the error (e.g. a
    variant of the authors' network that has no counterpart here).
    """
    rules = list(rules)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        hit = forward_key(key, rules)
        if hit is None:
            unknown.append(key)
            continue
        rule, module, tensor = hit
        if tensor is DROP:
            continue
        new_key = f"{module}.{tensor}"
        if new_key in out:
            raise AuthorsCheckpointError(f"two keys of the checkpoint map to {new_key!r} (one is {key!r})")
        out[new_key] = rule.transform(tensor, value) if rule.transform else value
    if unknown:
        notes = sorted({note for pattern, note in (hints or {}).items() for k in unknown if re.search(pattern, k)})
        raise AuthorsCheckpointError(
            f"unknown key(s) in the {network} checkpoint: {error_list(unknown)}"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    return out


def check_against(
    converted: Mapping[str, torch.Tensor], model: nn.Module, rules: Iterable[Rule], network: str
) -> None:
    """Raise when ``model`` (ours, e.g. built on the meta device) needs a key the converted checkpoint lacks, has no
    key the checkpoint brings, or has another shape; the message names the keys both ways."""
    rules = list(rules)
    own = model.state_dict()

    def authors_name(key: str) -> str:
        name = inverse_key(key, rules)
        return repr(key) if name is None else f"{key!r} (authors' {name!r})"

    missing = [k for k in own if k not in converted]
    if missing:
        raise AuthorsCheckpointError(
            f"the {network} checkpoint lacks {len(missing)} parameter(s)/buffer(s) our network needs: "
            + ", ".join(authors_name(k) for k in missing[:12])
            + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        )
    extra = [k for k in converted if k not in own]
    if extra:
        raise AuthorsCheckpointError(
            f"the {network} checkpoint has key(s) our network does not: "
            + ", ".join(authors_name(k) for k in extra[:12])
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(converted[k].shape)]
    if bad:
        raise AuthorsCheckpointError(
            f"shape mismatch in the {network} checkpoint: "
            + "; ".join(
                f"{authors_name(k)} {tuple(converted[k].shape)} vs ours {tuple(own[k].shape)}" for k in bad[:8]
            )
        )
