"""The merge rule, once for every adapter type: strength, alpha/rank scale, DoRA and bias deltas.

For one module, one network, strength m (already te/unet × block × schedule), original weight W:

    additive types:   W' = W + m·s·ΔW                       (s = alpha/rank of the type)
    with DoRA:        V = W + s·ΔW;  W' = V·(m·(d/‖V‖ − 1) + 1)   (LyCORIS forward semantics:
                      ‖V‖ per output row if d is (out, 1, ...), per input column if d is (1, in, ...))
    rotation types:   W' = rotate(W, m)                      (OFT, BOFT: m interpolates inside)
    bias:             b' = b + m·diff_b

Several networks on one module stack as W' = W + Σ_i (W'_i − W): each contribution is taken
against the original weight, so the order of networks does not matter.

A contribution may cover only some rows of the weight (`place`): a diffusers `to_q` on a fused `qkv`, an
adaLN weight whose halves the file orders the other way. Its W'(m) − W is then computed on those rows of W
alone (so DoRA norms, IA3, GLoRA and OFT see the weight the module was trained on) and zero elsewhere;
a LoRA's `up` is placed in those rows of a zero (rows × r) factor, so the one-GEMM path still applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .algorithms import Adapter
from .algorithms.lora import LoRA

Tensor = torch.Tensor

# Added to the DoRA norm, as LyCORIS `weight_decompose` does (float32 machine epsilon).
DORA_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Contribution:
    """One network's trained data for one target weight (everything but the strength)."""

    adapter: Adapter
    scale: float                      # alpha/rank (1 for types without a rank)
    dora_scale: Optional[Tensor] = None
    bias_delta: Optional[Tensor] = None  # diff_b / b_norm, shape of the bias (or its row slice)
    place: Optional[tuple] = None     # (rows of the whole weight, ((dst, src, n), ...)); None = the whole weight

    @property
    def linear_in_strength(self) -> bool:
        """W' − W is m times a fixed ΔW: the Patcher may then update by (m_new − m_old)·s·ΔW."""
        return self.adapter.additive and self.dora_scale is None

    def _take(self, full: Tensor) -> Tensor:
        """The module's rows of a whole-weight tensor, in the module's row order."""
        segments = sorted(self.place[1], key=lambda s: s[1])
        if len(segments) == 1:
            dst, _, n = segments[0]
            return full[dst:dst + n]
        return torch.cat([full[dst:dst + n] for dst, _, n in segments])

    def _put(self, part: Tensor) -> Tensor:
        """A whole-weight tensor: the module's rows placed, zero elsewhere."""
        out = part.new_zeros((self.place[0],) + tuple(part.shape[1:]))
        for dst, src, n in self.place[1]:
            out[dst:dst + n] = part[src:src + n]
        return out

    def low_rank(self, device: torch.device) -> Optional[tuple]:
        """(up (out, r), down (r, in·k·k)) with ΔW = up @ down, for plain LoRA; else None."""
        if isinstance(self.adapter, LoRA) and self.dora_scale is None:
            up, down = self.adapter.factors(device)
            return (up, down) if self.place is None else (self._put(up), down)
        return None

    def delta(self, base: Tensor) -> Optional[Tensor]:
        """The adapter's unscaled ΔW for the whole weight `base` (float32)."""
        if self.place is None:
            return self.adapter.delta(base)
        d = self.adapter.delta(self._take(base).contiguous())
        return None if d is None else self._put(d)

    def hadamard(self, base: Tensor, out: Optional[tuple] = None) -> Optional[tuple]:
        """The adapter's (w1, w2) product pair (LoHa) where the module is the whole weight; else None."""
        return self.adapter.hadamard(base, out) if self.place is None else None

    def weight_delta(self, base: Tensor, multiplier: float) -> Optional[Tensor]:
        """W'(m) − W in float32 on base's device; base is the float32 original weight."""
        if self.place is None:
            return self._weight_delta(base, multiplier)
        d = self._weight_delta(self._take(base).contiguous(), multiplier)
        return None if d is None else self._put(d)

    def _weight_delta(self, base: Tensor, multiplier: float) -> Optional[Tensor]:
        a = self.adapter
        if not a.additive:
            return a.rotate(base, multiplier) - base
        d = a.delta(base)
        if d is None:
            return None
        if self.dora_scale is None:
            return d * (multiplier * self.scale)   # not in place: `delta` may return stored data
        v = base + self.scale * d
        return dora(v, self.dora_scale.to(device=base.device, dtype=torch.float32), multiplier) - base

    def bias_change(self, bias: Tensor, multiplier: float) -> Optional[Tensor]:
        if self.bias_delta is None:
            return None
        d = self.bias_delta.to(device=bias.device, dtype=torch.float32).reshape(-1) * multiplier
        return (d if self.place is None else self._put(d)).reshape(bias.shape)


def dora_axis_is_input(dora_scale: Tensor, out_features: int) -> bool:
    """LyCORIS `wd_on_output=False` files store d as (1, in, ...): the norm is then per input column."""
    return dora_scale.shape[0] == 1 and out_features != 1


def dora(v: Tensor, d: Tensor, multiplier: float) -> Tensor:
    """V·(m·(d/‖V‖ − 1) + 1) with ‖V‖ on the axis d's shape names (see module doc)."""
    if dora_axis_is_input(d, v.shape[0]):
        n = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        n = n.reshape(1, -1, *([1] * (v.dim() - 2)))
    else:
        n = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    d = d.reshape(n.shape)
    return v * (multiplier * (d / (n + DORA_EPS) - 1) + 1)


def merged_bias(bias: Tensor, items: list) -> Tensor:
    """b + Σ_i m_i·diff_b_i in float32."""
    out = bias.float().clone()
    for c, m in items:
        d = c.bias_change(out, m)
        if d is not None:
            out += d
    return out
