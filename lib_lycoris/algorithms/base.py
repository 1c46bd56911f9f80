"""What every adapter type shares: the `Adapter` base class and the shared tensor math.

An adapter is one module's trained tensors of one type (LoRA, LoHa, ...), validated at construction.
It never knows the user's strength: the merge rule (strength, alpha/rank scale, DoRA, bias) lives in
`lib_lycoris.compose`, once for all types. Each adapter answers:

- `scale_for(alpha)`: the alpha/rank factor of its type (1 where the type has no rank);
- `fits(shape)`: whether its delta can land on a weight of that shape;
- `delta(base)`: the unscaled ΔW in float32 on `base`'s device (additive types); `base` is the
  original weight, needed only where `needs_base` (GLoRA, IA3);
- `rotate(base, m)`: W'(m) for the rotation types (OFT, BOFT), whose strength acts inside.

Shapes: a Linear weight is (out, in); a Conv2d weight is (out, in/groups, kh, kw).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Mapping, Optional

import torch

from ..errors import FormatError

Tensor = torch.Tensor

# Suffixes any adapter type may carry besides its own (handled in `compose`, not by the type).
COMMON_KEYS = frozenset({"alpha", "dora_scale", "diff_b"})


@dataclass(frozen=True)
class Adapter:
    """Base of every adapter dataclass; subclasses are frozen dataclasses with named tensor fields."""

    # Registry data, set by each subclass:
    algo: ClassVar[str] = ""             # name used in reports and the `inspect` output
    markers: ClassVar[frozenset] = frozenset()   # a key from this set marks a module as this type
    keys: ClassVar[frozenset] = frozenset()      # every key the type reads (markers included)
    additive: ClassVar[bool] = True      # W' = W + m·s·ΔW (False: rotation types, `rotate`)
    needs_base: ClassVar[bool] = False   # `delta` reads the original weight
    supports_dora: ClassVar[bool] = False
    has_bias_delta: ClassVar[bool] = False  # the type itself carries a bias delta (`bias_delta`)

    @classmethod
    def accepts(cls, tensors: Mapping[str, Tensor]) -> bool:
        """Extra test when two types share a marker (see `registry.DECLARED_OVERLAPS`)."""
        return True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "Adapter":
        raise NotImplementedError

    # --- what the merge rule asks -------------------------------------------------------------
    def rank(self) -> Optional[int]:
        return None

    def scale_for(self, alpha: Optional[float]) -> float:
        """alpha/rank for ranked types; alpha missing or 0 means scale 1 (alpha = rank)."""
        r = self.rank()
        if r is None or alpha is None or alpha == 0:
            return 1.0
        return float(alpha) / r

    def out_features(self) -> int:
        raise NotImplementedError

    def numel(self) -> int:
        """Number of elements of the full ΔW (to check it against the target weight)."""
        raise NotImplementedError

    def fits(self, shape: tuple) -> bool:
        numel = 1
        for s in shape:
            numel *= s
        return self.out_features() == shape[0] and self.numel() == numel

    def delta(self, base: Tensor) -> Tensor:
        """Unscaled ΔW, float32, shape of `base`, on `base`'s device."""
        raise NotImplementedError

    def hadamard(self, base: Tensor, out: Optional[tuple] = None) -> Optional[tuple]:
        """(w1, w2) float32, shape of `base`, with delta = w1 ⊙ w2 (LoHa), so a writer can fuse the product
        into its add (addcmul) instead of materialising ΔW; None for other types. out: two flat float32
        buffers of at least base.numel() elements to compute into (no fresh full-size memory)."""
        return None

    def rotate(self, base: Tensor, multiplier: float) -> Tensor:
        raise NotImplementedError

    def bias_delta(self) -> Optional[Tensor]:
        return None

    def rows(self, start: int, stop: int) -> Optional["Adapter"]:
        """The same type whose ΔW is rows [start, stop) of this one's, from sliced factors (exact); None
        where the type cannot be cut that way (its rows mix: Kronecker, rotations, weight-dependent)."""
        return None

    def tensors(self) -> dict:
        """The named tensor fields (None-valued ones left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# --- validation helpers ---------------------------------------------------------------------------

def need(tensors: Mapping[str, Tensor], key: str, where: str, algo: str) -> Tensor:
    """The tensor under `key`, or a FormatError naming the module and the keys it does have."""
    t = tensors.get(key)
    if t is None:
        raise FormatError(f"{algo} module lacks '{key}' (has: {', '.join(sorted(tensors))})",
                          key=where, keys=tuple(tensors))
    return t


def check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise FormatError(message, key=where)


def f32(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """The compute copy of a stored factor: float32 on the weight's device."""
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


def oft_extras(tensors: Mapping[str, Tensor], rows: int, where: str, algo: str) -> tuple:
    """(rescale or None, constraint factor) of an OFT/BOFT module; rescale must have `rows` rows."""
    rescale = tensors.get("rescale")
    if rescale is not None:
        check(rescale.dim() >= 1 and rescale.shape[0] == rows, where,
              f"{algo} rescale {tuple(rescale.shape)} does not match {rows} rows")
    alpha = tensors.get("alpha")
    return rescale, 0.0 if alpha is None else float(alpha.float().reshape(-1)[0])


# --- shared tensor math -----------------------------------------------------------------------------

def rebuild_tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker/CP rebuild used by LoHa and LoKr: T[o,c,...] = Σ_ij t[i,j,...]·wb[j,c]·wa[i,o].

    t: (r, r, kh, kw), wa: (r, out), wb: (r, in) -> (out, in, kh, kw).
    """
    return torch.einsum("ij...,jc,io->oc...", t, wb, wa).contiguous()   # kron needs a contiguous factor


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ; ‖Q‖_F over all blocks clipped to `constraint` (> 0).

    blocks: (..., b, b) -> R: (..., b, b). Follows lycoris/functional/diag_oft.py `get_r` (4.1.3).
    """
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.norm(q) + 1e-8  # epsilon as in the reference
        if norm > constraint:
            q = q * (constraint / norm)
    return (eye + q) @ torch.linalg.inv(eye - q)
