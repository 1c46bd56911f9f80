"""The one registry of adapter types, validated at import.

`detect(tensors, where)` picks the type of one module from its key set: a type claims a module when
the module has one of its marker keys. Two types may share a marker only where declared below,
with the test that tells them apart. A module whose keys fit no type, or several, is a FormatError
that lists its keys. There is no second name-to-class table.
"""
from __future__ import annotations

from typing import Mapping

from ..errors import FormatError
from .base import COMMON_KEYS, Adapter, Tensor
from .boft import BOFT
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .lokr import LoKr
from .loha import LoHa
from .lora import LoRA
from .norm import Norm
from .oft import DiagOFT
from .peft_oft import PeftOFT

ALGORITHMS: tuple = (LoRA, LoHa, LoKr, IA3, GLoRA, Full, Norm, DiagOFT, BOFT, PeftOFT)

# Types sharing a marker, each told apart by its `accepts` (the tensor rank of `oft_blocks`).
DECLARED_OVERLAPS = {frozenset({"diag-oft", "boft"})}

BY_NAME = {a.algo: a for a in ALGORITHMS}


def _validate() -> None:
    names = [a.algo for a in ALGORITHMS]
    if len(set(names)) != len(names):
        raise RuntimeError(f"duplicate algorithm names in the registry: {names}")
    for a in ALGORITHMS:
        if not a.markers or not a.markers <= a.keys:
            raise RuntimeError(f"{a.algo}: markers must be a non-empty subset of its keys")
        if a.keys & COMMON_KEYS - {"diff_b"}:
            raise RuntimeError(f"{a.algo}: claims a common key {sorted(a.keys & COMMON_KEYS)}")
    for i, a in enumerate(ALGORITHMS):
        for b in ALGORITHMS[i + 1:]:
            if a.markers & b.markers and frozenset({a.algo, b.algo}) not in DECLARED_OVERLAPS:
                raise RuntimeError(f"{a.algo} and {b.algo} share markers {sorted(a.markers & b.markers)}")


_validate()


def detect(tensors: Mapping[str, Tensor], where: str = "") -> type:
    """The adapter class for one module's tensors (keys are canonical suffixes, see `keys`)."""
    present = set(tensors)
    found = [a for a in ALGORITHMS if a.markers & present and a.accepts(tensors)]
    if not found and present <= {"diff_b", "alpha"} and "diff_b" in present:
        return Full  # a bias-only delta
    if len(found) != 1:
        what = "no known adapter type" if not found else "several adapter types (" + \
            ", ".join(a.algo for a in found) + ")"
        raise FormatError(f"module keys match {what}: {', '.join(sorted(present))}", key=where,
                          keys=sorted(present))
    algo = found[0]
    unknown = present - algo.keys - COMMON_KEYS
    if unknown:
        raise FormatError(f"{algo.algo} module has keys no {algo.algo} file has: {', '.join(sorted(unknown))}",
                          key=where, keys=sorted(present))
    return algo


def build(tensors: Mapping[str, Tensor], where: str = "") -> Adapter:
    """Detect the type and construct (validate) the adapter from its tensors."""
    return detect(tensors, where).from_tensors(tensors, where)


__all__ = ["ALGORITHMS", "Adapter", "BY_NAME", "DECLARED_OVERLAPS", "build", "detect"]
