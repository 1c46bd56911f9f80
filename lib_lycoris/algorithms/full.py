"""Full weight difference (LyCORIS `FullModule`, ComfyUI "diff"): the trained weight minus the base.

File keys: `diff` (shape of W), `diff_b` (shape of the bias; alone it is a bias-only delta).
W' = W + m·diff, b' = b + m·diff_b. No alpha.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from .base import Adapter, Tensor, check, f32


@dataclass(frozen=True)
class Full(Adapter):
    diff: Optional[Tensor] = None
    diff_b: Optional[Tensor] = None

    algo = "full"
    markers = frozenset({"diff"})
    keys = markers | {"diff_b"}
    has_bias_delta = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "Full":
        diff, diff_b = tensors.get("diff"), tensors.get("diff_b")
        check(diff is None or diff.dim() >= 1, where, "diff is a scalar, not a weight delta")
        if diff_b is not None:
            check(diff_b.dim() == 1, where, f"diff_b {tuple(diff_b.shape)} is not a bias vector")
        return cls(diff=diff, diff_b=diff_b)

    def out_features(self) -> int:
        return (self.diff if self.diff is not None else self.diff_b).shape[0]

    def numel(self) -> int:
        return self.diff.numel() if self.diff is not None else -1

    def fits(self, shape: tuple) -> bool:
        if self.diff is None:   # bias-only: checked against the bias
            return shape[0] == self.diff_b.numel()
        return tuple(self.diff.shape) == tuple(shape) or super().fits(shape)

    def delta(self, base: Tensor) -> Optional[Tensor]:
        if self.diff is None:
            return None
        return f32(self.diff, base.device).reshape(base.shape)

    def bias_delta(self) -> Optional[Tensor]:
        return self.diff_b

    def rows(self, start: int, stop: int) -> "Full":
        return Full(diff=None if self.diff is None else self.diff[start:stop],
                    diff_b=None if self.diff_b is None else self.diff_b[start:stop])
