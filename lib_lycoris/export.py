"""Export, extract and resize: one kohya-style LoRA/LoCon file from a stack of networks, from the difference
of two checkpoints, or from one network at another rank (issue #13; user documentation: docs/export.md).

    export_networks([(network, request), ...], "out.safetensors", RankMode.rank(32), model=None)
    export_prompt("<lora:a:0.8:in=0> <lora:b:0.5>", ["models/Lora"], "out.safetensors", RankMode.size_mb(20))
    extract_checkpoint("tuned.safetensors", "base.safetensors", "out.safetensors", RankMode.fro(0.9))
    resize_network("big.safetensors", "small.safetensors", RankMode.rank(32))

Per output module ("unit": one weight, or one row block of a fused weight such as OpenCLIP's q/k/v), the
target is ΔW = Σ_i (W'_i(m_i) − W) over the inputs, the merge rule of `compose` with each input's strength
m_i (te/unet × block weight of its tag). ΔW is held in the cheapest exact form:

- factors U (out × R) @ V (R × in·kh·kw): LoRA/LoCon (`Contribution.low_rank`), and LoHa and LoKr through
  their exact low-rank forms (`factor_form`): a Hadamard product of two rank-r products has rank ≤ r₁r₂
  ((A₁B₁) ⊙ (A₂B₂) = (A₁ ∗ A₂)(B₁ • B₂), the row-wise and column-wise Khatri–Rao products), and a Kronecker
  product kron(P Qᵀ, X Y) = kron(P, X)·kron(Qᵀ, Y) has rank ≤ rank(w1)·rank(w2);
- dense: full diffs, checkpoint differences (extract), and the types whose ΔW reads the base weight (DoRA,
  OFT, BOFT, IA3, GLoRA), which need `model`.

`svd` then gives the SVD in factor space (QR of the stacked factors and the SVD of an R × R core; exact,
O((out + in)·R²)) where that is cheaper than the dense SVD, else dense (`torch.linalg.svd`, or
`torch.svd_lowrank` for a small fixed rank). The rank of each unit follows the mode:

- `rank N`: min(N, numerical rank): the best rank-N approximation (Eckart–Young);
- `fro F`: the smallest rank that keeps F of ‖ΔW‖_F²;
- `size M`: a global budget of M·10⁶ bytes of lora_up/lora_down, spread by water-filling (`svd.water_fill`:
  pass 1 takes every unit's singular values, pass 2 writes each at its rank);
- `exact`: LoRA-only units concatenated along the rank (alpha and strength folded into up); other units at the
  rank where the relative error is ≤ EXACT_TOL; a unit that is not smaller that way than its full ΔW is
  written as a `diff` module. Every unit is verified: relative error ≤ EXACT_VERIFY (float32 output).

Written per unit: `lora_up.weight` (out, k[, 1, 1]), `lora_down.weight` (k, in[, kh, kw]) (a conv k×k is a
LoCon), `alpha` = k (scale 1), `diff_b` when a bias changes; 1-D weights (norms) and `--exact` misses as
`diff`. Work streams one unit at a time (peak memory ≈ one unit's ΔW); the written file is collected in memory
and written atomically by `merge.CheckpointWriter` (a failure leaves no output). The error of every unit is
measured on what is written (after rounding to the output dtype and any clamping), not assumed.

Without `model`, modules are matched by their names as the files spell them, shapes come from the networks, and
the kernel of a conv module whose factors are stored flat (LoHa/LoKr without Tucker) from another input of the
same module or from the SD UNet's module names (`_guess_kernel`); `model` (a checkpoint's header) removes the
guessing and is required for the types above. Inputs are checked strictly as `merge` checks them
(`merge.bind_networks`): a module the model lacks or does not fit refuses the export (PartialMergeError).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import svd
from .algorithms.loha import LoHa
from .algorithms.lokr import LoKr
from .algorithms.lora import LoRA
from .blocks import BlockMapError, block_id
from .compose import Contribution
from .errors import CheckpointFileError, LycorisError
from .files import PathLike, addnet_hash
from .merge import CheckpointWriter, bind_networks, checkpoint_shapes, merge_problems
from .modelmap import ModelMap, Target
from .network import Network, NetworkModule, load_network
from .patcher import Strength, block_of, needs_weight, stack_factors

log = logging.getLogger("lycoris")

Tensor = torch.Tensor

# --exact: the relative error ‖ΔW − written‖_F/‖ΔW‖_F an SVD cut may leave, and what the verification of every
# written unit accepts (issue #13: "error ≤ 1e-5 relative"; the cut leaves 10× margin for fp32 rounding).
EXACT_TOL = 1e-6
EXACT_VERIFY = 1e-5
# Measured error below this fraction of ‖ΔW‖² (energy kept > 99.9%): the error is recomputed in float64, since
# float32 products and the float32 SVD's ‖ΔW‖² (each good to ~1e-7 relative) would leave err² off by > 1e-4.
RESIDUAL_RECHECK = 1e-3
# extract: a text encoder whose weights moved by at most this much (max |ΔW|) is left out (kohya
# `extract_lora_from_models.py --min_diff` default 0.01: fine-tunes that freeze the TE still differ by fp16
# rounding). export/resize default to 0: any change an input makes is written (a trained LoRA's TE part is
# small on purpose); only a TE at strength 0 is left out there.
TE_MIN_DIFF_EXTRACT = 0.01
# 1 MB of --size-mb (decimal, as the issue states; lora_up/lora_down bytes only).
MB = 10 ** 6
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Lines of the per-unit report the CLI prints (the worst by relative error); --report FILE.json has all.
TOP_LINES = 10
# The rank modes as the hosts' "Export LoRA" actions offer them (UI choice, API `mode`): `RankMode.from_choice`.
RANK_CHOICES = ("rank", "fro", "size-mb", "exact")

_SS_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                   "sd3": "stable-diffusion-3", "flux": "flux-1-dev"}
_MODELSPEC_IMPL = {"sd1": "diffusers", "sd2": "diffusers",
                   "sdxl": "https://github.com/Stability-AI/generative-models",
                   "sd3": "https://github.com/Stability-AI/generative-models",
                   "flux": "https://github.com/black-forest-labs/flux"}
_SINGLE_TE = ("sd1", "sd2")

# SD UNet convolutions by name (diffusers and LDM spellings), for a flat-stored factor without `model`:
# resnet conv1/conv2 (in_layers.2/out_layers.3), conv_in/conv_out, down/upsamplers are 3×3; shortcuts 1×1;
# SD1's transformer proj_in/proj_out are 1×1 convs (SD2/SDXL use Linear there).
_CONV3 = re.compile(r"(^|_)(conv1|conv2|conv_in|conv_out|in_layers_2|out_layers_3|op|input_blocks_0_0|out_2"
                    r"|downsamplers_0_conv|upsamplers_0_conv|output_blocks_\d+_[12]_conv)$")
_CONV1 = re.compile(r"(^|_)(conv_shortcut|skip_connection)$")
_SD1_PROJ = re.compile(r"(^|_)(proj_in|proj_out)$")
# LBW ids of the UNet's three groups, to tell whether a request has block weights at all.
_PROBE_BLOCKS = ("IN04", "M00", "OUT03", "IN01", "OUT08")
# extract: embedding tables (CLIP token/position, T5 shared) are 2-D weights but no Linear layer: not extracted.
_EMBEDDING = re.compile(r"(^|\.)(embeddings?\.|token_embedding\.|position_embedding\.|embed_tokens\.|shared\.)")


class ExportError(LycorisError):
    """An export, extract or resize was refused: bad mode, impossible budget, inputs that do not go together,
    a type that needs `--model`, or a verification that failed. Nothing is written."""


# --------------------------------------------------------------------------------------------------
# Modes and reports

@dataclass(frozen=True)
class RankMode:
    """How ranks are chosen: kind 'rank' (N), 'fro' (fraction F of ‖ΔW‖_F²), 'size' (M megabytes, 10⁶ bytes of
    lora_up/lora_down) or 'exact'."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "rank" and (self.value < 1 or self.value != int(self.value)):
            raise ExportError(f"the rank (--rank) must be a whole number ≥ 1, not {self.value:g}")
        if self.kind == "fro" and not 0.0 < self.value <= 1.0:
            raise ExportError(f"the fraction of ‖ΔW‖² to keep (--fro) must be in (0, 1], not {self.value:g}")
        if self.kind == "size" and not (self.value > 0 and math.isfinite(self.value)):
            raise ExportError(f"the size budget (--size-mb) must be a positive number of megabytes, not {self.value:g}")
        if self.kind not in ("rank", "fro", "size", "exact"):
            raise ExportError(f"unknown rank mode {self.kind!r}")

    @classmethod
    def rank(cls, n: int) -> "RankMode":
        return cls("rank", float(n))

    @classmethod
    def fro(cls, fraction: float) -> "RankMode":
        return cls("fro", float(fraction))

    @classmethod
    def size_mb(cls, megabytes: float) -> "RankMode":
        return cls("size", float(megabytes))

    @classmethod
    def exact(cls) -> "RankMode":
        return cls("exact")

    @classmethod
    def from_choice(cls, choice: str, value: Optional[float] = None) -> "RankMode":
        """The mode a host's UI or API names: 'rank' N, 'fro' F, 'size-mb' M (`RANK_CHOICES`), or 'exact' (no
        value). Raises ExportError for an unknown choice or a missing, non-numeric or non-finite value."""
        if choice == "exact":
            return cls.exact()
        if choice not in RANK_CHOICES:
            raise ExportError(f"unknown rank mode {choice!r}; one of {', '.join(RANK_CHOICES)}")
        what = {"rank": "the rank N", "fro": "the fraction F of ‖ΔW‖² to keep",
                "size-mb": "the size budget M in megabytes"}[choice]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ExportError(f"rank mode {choice!r} needs a number: {what}")
        return cls("size" if choice == "size-mb" else choice, number)

    def describe(self) -> str:
        return {"rank": f"rank {int(self.value)}", "fro": f"fro {self.value:g}",
                "size": f"size {self.value:g} MB (10^6 bytes of lora_up/lora_down)", "exact": "exact"}[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": None if self.kind == "exact" else self.value}


@dataclass
class UnitReport:
    """What was written for one output module and how close it is."""

    name: str
    component: str
    shape: tuple
    sources: str           # input types, e.g. 'lora+loha'
    written: str           # 'lora' | 'diff' | 'dropped' (rank 0 under a --size-mb budget: left out)
    rank: int              # 0 for a diff or a dropped module
    bytes: int             # of lora_up + lora_down (lora) or diff
    energy: float          # ‖ΔW‖_F²
    error: float           # ‖ΔW − written‖_F, measured
    optimal: Optional[float]   # Eckart–Young error at this rank where every singular value is known
    method: str            # 'concat', 'factor R=…', 'svd', 'svd_lowrank q=… niter=…'
    note: str = ""

    @property
    def rel_error(self) -> float:
        return self.error / math.sqrt(self.energy) if self.energy > 0 else 0.0

    @property
    def retained(self) -> float:
        return 1.0 - self.error ** 2 / self.energy if self.energy > 0 else 1.0

    def line(self) -> str:
        """One report line: name, what was written, relative error (and the optimum), energy kept, path."""
        known = self.optimal is not None and self.energy > 0
        opt = f" (optimal {self.optimal / math.sqrt(self.energy):.4g})" if known else ""
        what = f"rank {self.rank}" if self.written == "lora" else self.written
        return (f"{self.name}  {what}  rel. error {self.rel_error:.4g}{opt}  energy kept {100 * self.retained:.3f}%"
                f"  [{self.sources}; {self.method}]" + (f"  {self.note}" if self.note else ""))

    def to_dict(self) -> dict:
        return {"name": self.name, "component": self.component, "shape": list(self.shape), "sources": self.sources,
                "written": self.written, "rank": self.rank, "bytes": self.bytes, "energy": self.energy,
                "error": self.error, "rel_error": self.rel_error, "retained_energy": self.retained,
                "optimal_error": self.optimal, "method": self.method, "note": self.note}


@dataclass
class ExportReport:
    """The result of an export, extract or resize: per-unit reports, lines worth telling, totals."""

    output: str
    kind: str                       # 'export' | 'extract' | 'resize'
    mode: RankMode
    dtype: str
    units: list = field(default_factory=list)     # UnitReport
    lines: list = field(default_factory=list)     # notes: units left out, written as diff, TE skipped, …
    sources: list = field(default_factory=list)   # metadata of the inputs
    arch: str = "unknown"
    seconds: float = 0.0

    @property
    def lora_bytes(self) -> int:
        return sum(u.bytes for u in self.units if u.written == "lora")

    @property
    def diff_bytes(self) -> int:
        return sum(u.bytes for u in self.units if u.written == "diff")

    @property
    def retained(self) -> float:
        """1 − Σ error² / Σ ‖ΔW‖² over every written unit."""
        total = sum(u.energy for u in self.units)
        return 1.0 - sum(u.error ** 2 for u in self.units) / total if total > 0 else 1.0

    @property
    def max_rel_error(self) -> float:
        return max((u.rel_error for u in self.units), default=0.0)

    def worst(self, n: int = TOP_LINES) -> list:
        """The n written units with the largest relative error."""
        return sorted(self.written, key=lambda u: -u.rel_error)[:n]

    @property
    def written(self) -> list:
        return [u for u in self.units if u.written != "dropped"]

    def summary(self) -> str:
        diff = f" + {self.diff_bytes / MB:.3f} MB diff" if self.diff_bytes else ""
        ranks = [u.rank for u in self.units if u.written == "lora"]
        span = f", ranks {min(ranks)}-{max(ranks)}" if ranks else ""
        dropped = len(self.units) - len(self.written)
        left = f", {dropped} left out at rank 0" if dropped else ""
        return (f"{self.kind}: {len(self.written)} modules{left} ({self.mode.describe()}{span}) -> {self.output}: "
                f"{self.lora_bytes / MB:.3f} MB lora_up/lora_down{diff} ({self.dtype}); retained energy "
                f"{self.retained:.6f}, worst relative error {self.max_rel_error:.4g}; {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        return {"output": self.output, "kind": self.kind, "mode": self.mode.to_dict(), "dtype": self.dtype,
                "arch": self.arch, "retained_energy": self.retained, "max_rel_error": self.max_rel_error,
                "lora_bytes": self.lora_bytes, "diff_bytes": self.diff_bytes, "seconds": self.seconds,
                "lines": list(self.lines), "sources": self.sources, "units": [u.to_dict() for u in self.units]}


Progress = Callable[[str, int, int], None]   # (stage, done, total)


# --------------------------------------------------------------------------------------------------
# Exact low-rank forms of LoHa and LoKr

def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker_pair(t: Tensor, wa: Tensor, wb: Tensor) -> tuple:
    """The Tucker rebuild T(t, wa, wb) (out, in, k, k) as left (out, r) @ right (r, in·k·k): left = waᵀ,
    right[i, (c, k)] = Σ_j t[i, j, k]·wb[j, c] (see `algorithms.base.rebuild_tucker`)."""
    return wa.T, _flat(torch.einsum("ij...,jc->ic...", t, wb.flatten(1)))


def _identity_split(w: Tensor) -> tuple:
    """A full (a, c) matrix as left @ right of inner size min(a, c), one side the identity."""
    a, c = w.shape
    eye = torch.eye(min(a, c), dtype=w.dtype, device=w.device)
    return (eye, w) if a <= c else (w, eye)


def factor_rank(c: Contribution) -> Optional[int]:
    """The inner dimension of `factor_form(c)` (without building it); None where there is none."""
    a = c.adapter
    if c.dora_scale is not None or not a.additive or a.needs_base:
        return None
    if isinstance(a, LoRA):
        return a.down.shape[0]
    if c.place is not None:
        return None
    if isinstance(a, LoHa):
        return a.w1_b.shape[0] * a.w2_b.shape[0]
    if isinstance(a, LoKr):
        (ra, rc), w2 = a._shapes()
        k1 = a.w1_a.shape[1] if a.w1 is None else min(ra, rc)
        if a.w2 is None:
            k2 = (a.t2 if a.t2 is not None else a.w2_b).shape[0]
        else:
            k2 = min(w2[0], math.prod(w2[1:]))
        return k1 * k2
    return None


def factor_form(c: Contribution, device: torch.device) -> Optional[tuple]:
    """(up (out, R), down (R, in·k·k)), float32, with up @ down = the unscaled ΔW of `c`, exact, for LoRA (any
    placement), LoHa and LoKr (whole weight, no DoRA); None for every other case (the ΔW is then dense)."""
    if factor_rank(c) is None:
        return None
    low = c.low_rank(device)
    if low is not None:
        return low
    a = c.adapter
    f = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    if isinstance(a, LoHa):
        if a.t1 is not None:
            a1, b1 = _tucker_pair(f(a.t1), f(a.w1_a), f(a.w1_b))
            a2, b2 = _tucker_pair(f(a.t2), f(a.w2_a), f(a.w2_b))
        else:
            a1, b1, a2, b2 = f(a.w1_a), _flat(f(a.w1_b)), f(a.w2_a), _flat(f(a.w2_b))
        # (out, r1) ∗ (out, r2) -> (out, r1·r2); (r1, n) • (r2, n) -> (r1·r2, n)
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up, down
    # LoKr: ΔW (a·b, c·d·k·k) = kron(w1 (a, c), w2 (b, d·k·k)) = kron(P, X) @ kron(Qᵀ, Y)
    p, qt = (f(a.w1_a), f(a.w1_b)) if a.w1 is None else _identity_split(f(a.w1))
    if a.w2 is not None:
        x, y = _identity_split(_flat(f(a.w2)))
    elif a.t2 is not None:
        x, y = _tucker_pair(f(a.t2), f(a.w2_a), f(a.w2_b))
    else:
        x, y = f(a.w2_a), _flat(f(a.w2_b))
    return torch.kron(p.contiguous(), x.contiguous()), torch.kron(qt.contiguous(), y.contiguous())


# --------------------------------------------------------------------------------------------------
# Planning: which units, from which contributions

@dataclass
class _Item:
    contribution: Contribution   # placed in the whole weight (`Target.placement`) or the module itself
    multiplier: float
    module: NetworkModule
    source: int                  # index into the sources


@dataclass
class _Unit:
    name: str                    # output module name (kohya)
    component: str
    shape: tuple                 # ΔW as written: (out, in, kh, kw), (out, in) or (out,)
    whole: tuple                 # the parameter's shape (ΔW is computed on it, then `rows` taken)
    rows: Optional[tuple] = None
    weight: Optional[str] = None          # model parameter name (with a model)
    bias: Optional[str] = None
    items: list = field(default_factory=list)
    dense_source: Optional[Callable[[], Tensor]] = None   # extract: the (out, in·k·k) ΔW, float32

    @property
    def out(self) -> int:
        return self.shape[0]

    @property
    def inner(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def algos(self) -> str:
        if self.dense_source is not None:
            return "checkpoint diff"
        return "+".join(dict.fromkeys(i.module.algo for i in self.items))


def _te_prefix(arch: str, components: Iterable[str]) -> dict:
    """kohya's text-encoder prefixes: one text encoder (SD1/SD2) is `lora_te_`, several `lora_te1_`, …"""
    comps = set(components)
    single = arch in _SINGLE_TE or (arch == "unknown" and not comps & {"te2", "te3"})
    return {"te1": "lora_te_" if single else "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_", "unet": "lora_unet_"}


def output_name(target: Target, arch: str, prefixes: Mapping[str, str]) -> str:
    """The kohya name written for a target: the canonical `Target.name` (diffusers UNet names for SD1/SD2, as
    kohya writes them), SGM names for the SDXL UNet (what sd-scripts' SDXL trainer writes), `lora_te_` for
    a single text encoder."""
    body = target.name.split("_", 2)[2]           # 'lora_unet_<body>' / 'lora_te1_<body>'
    if target.component == "unet" and arch == "sdxl" and target.ldm_path:
        body = target.ldm_path.replace(".", "_")
    return prefixes[target.component] + body


def _guess_kernel(body: str, inner: int, arch: str) -> Optional[tuple]:
    """(kh, kw) of an SD UNet conv whose factors are stored flat, from its name; None: a Linear (see _CONV3)."""
    if _CONV3.search(body) and inner % 9 == 0:
        return (3, 3)
    if _CONV1.search(body) or (arch == "sd1" and _SD1_PROJ.search(body)):
        return (1, 1)
    return None


def _stored_kernel(mod: NetworkModule) -> Optional[tuple]:
    """The kernel a module's tensors state (4-D factors or diff), () for a Linear or 1-D weight, None when
    they are stored flat and do not say."""
    a = mod.adapter
    for name in ("mid", "t1", "t2", "diff"):
        t = getattr(a, name, None)
        if t is not None and t.dim() == 4:
            return tuple(t.shape[2:])
    for name in ("down", "w2"):
        t = getattr(a, name, None)
        if t is not None:
            return tuple(t.shape[2:]) if t.dim() == 4 else (() if name == "down" else None)
    if a.algo in ("norm", "full"):
        return ()
    return None


def _bare_shape(mods: list, body: str, arch: str) -> tuple:
    """ΔW shape of one module from the networks alone (no model); mods: [(NetworkModule, file)]."""
    first, file = mods[0]
    out, numel = first.adapter.out_features(), first.adapter.numel()
    for m, f in mods[1:]:
        if (m.adapter.out_features(), m.adapter.numel()) != (out, numel):
            raise ExportError(f"{first.component}:{body}: {file} has a {first.algo} delta of {out} × "
                              f"{numel // max(out, 1)} elements, {f} a {m.algo} delta of {m.adapter.out_features()} "
                              f"× {m.adapter.numel() // max(m.adapter.out_features(), 1)}: the networks do not "
                              "fit the same model", file=str(f))
    if first.algo == "norm" or numel <= out:      # 1-D (norm) weight, or a bias-only diff
        return (out,)
    kernels = [k for k in (_stored_kernel(m) for m, _ in mods) if k is not None]
    kernel = kernels[0] if kernels else _guess_kernel(body, numel // out, arch)
    if kernel:
        k = math.prod(kernel)
        return (out, numel // out // k) + tuple(kernel)
    return (out, numel // out)


def _common_arch(sources: Sequence["_Source"]) -> str:
    known = {}
    for s in sources:
        if s.network.base_model != "unknown":
            known.setdefault(s.network.base_model, s.network)
    if len(known) > 1:
        raise ExportError("the networks are made for different base models: " + ", ".join(
            f"{n.path.name} ({a}, {n.base_model_reason})" for a, n in known.items()),
            file=str(next(iter(known.values())).path))
    return next(iter(known), "unknown")


def _block_without_model(component: str, body: str, arch: str) -> Optional[str]:
    if arch == "unknown":
        return None if component == "unet" else "BASE"
    try:
        return block_id(component, body, arch)
    except BlockMapError:
        return None


def _normal_body(component: str, body: str) -> str:
    """One spelling per text-encoder module (HF CLIP with and without `text_model_`; kohya writes it)."""
    if component in ("te1", "te2") and body.startswith("encoder_layers_"):
        return "text_model_" + body
    return body


def _refuse_base_dependent(found: list) -> None:
    if not found:
        return
    by_file: dict = {}
    for file, label, algo in found:
        by_file.setdefault(file, []).append((label, algo))
    first_file, items = next(iter(by_file.items()))
    algos = sorted({a for _, a in items})
    raise ExportError(f"{len(found)} module(s) are {', '.join(algos)}, whose ΔW depends on the base weight "
                      f"(first: {items[0][0]}): give --model CKPT (the checkpoint they are applied to)",
                      file=first_file)


def _uses_blocks(request, step: tuple) -> bool:
    """Whether a request's UNet weight differs between blocks (in/mid/out or lbw given)."""
    plain = request.weight("unet", None, *step)
    return any(request.weight("unet", b, *step) != plain for b in _PROBE_BLOCKS)


def _plan_bare(sources: Sequence["_Source"], step: tuple) -> tuple:
    """(units, arch) from the networks' own module names and shapes."""
    arch = _common_arch(sources)
    if arch == "unknown":
        for src in sources:
            if _uses_blocks(src.request, step):
                raise ExportError(f"{src.label}: block weights need the base model's block map, and no network "
                                  "says which base model it is for: give --model CKPT", file=str(src.network.path))
    groups: dict = {}
    needs_base = []
    for i, src in enumerate(sources):
        for (comp, body), mod in src.network.modules.items():
            key = (comp, _normal_body(comp, body))
            m = float(src.request.weight(comp, _block_without_model(comp, body, arch), *step))
            if m == 0.0:
                continue
            c = mod.contribution(getattr(src.request, "dyn", None))
            if needs_weight(c):
                needs_base.append((str(src.network.path), f"{comp}:{body}", mod.algo))
                continue
            groups.setdefault(key, []).append((_Item(c, m, mod, i), str(src.network.path)))
    _refuse_base_dependent(needs_base)
    prefixes = _te_prefix(arch, (c for c, _ in groups))
    units = []
    for (comp, body), items in groups.items():
        shape = _bare_shape([(it.module, f) for it, f in items], body, arch)
        units.append(_Unit(name=prefixes[comp] + body, component=comp, shape=shape, whole=shape,
                           items=[it for it, _ in items]))
    return units, arch


def _plan_model(sources: Sequence["_Source"], shapes: Mapping[str, tuple], step: tuple, strict: bool) -> tuple:
    """(units, arch, lines): every source bound to the model (strictly, as `merge`: else the modules left out
    are listed in `lines`), units per model weight."""
    mm = ModelMap.from_state_dict(shapes)
    pairs = [(s.network, s.request) for s in sources]
    bindings = bind_networks(mm, pairs, strict=strict)
    lines = [f"not exported: {p}" for b in bindings for p in merge_problems(b, mm)]
    per_weight: dict = {}
    for i, (b, src) in enumerate(zip(bindings, sources)):
        for target, mod in b.pairs:
            m = float(src.request.weight(target.component, block_of(target, mm), *step))
            if m == 0.0:
                continue
            c = mod.contribution(getattr(src.request, "dyn", None), target.placement())
            per_weight.setdefault(target.weight, (target, []))[1].append(_Item(c, m, mod, i))
    primaries: dict = {}
    for t in mm.targets:
        primaries.setdefault(t.weight, []).append(t)
    prefixes = _te_prefix(mm.arch, mm.components)
    units = []
    for weight, (bound, items) in per_weight.items():
        for t in primaries.get(weight) or [bound]:
            mine = [it for it in items if _overlaps(it.contribution.place, t.rows)]
            if not mine:
                continue                           # e.g. OpenCLIP's v rows when only q_proj is trained
            whole = tuple(t.weight_shape or t.shape)
            units.append(_Unit(name=output_name(t, mm.arch, prefixes), component=t.component, shape=tuple(t.shape),
                               whole=whole, rows=t.rows, weight=weight, bias=t.bias, items=mine))
    return units, mm.arch, lines


def _overlaps(place: Optional[tuple], rows: Optional[tuple]) -> bool:
    """Whether a contribution placed at `place` (`Target.placement`) touches the rows (start, stop) of a unit."""
    if place is None or rows is None:
        return True
    return any(dst < rows[1] and rows[0] < dst + n for dst, _, n in place[1])


# --------------------------------------------------------------------------------------------------
# Reading a model's weights one at a time

class _Weights:
    """A model's tensors by name, read one at a time: a .safetensors file (through `safe_open`, validated by
    `merge.checkpoint_shapes` first) or an in-memory state dict (the WebUI's unpatched weights)."""

    def __init__(self, model: Union[PathLike, Mapping[str, Tensor]]) -> None:
        if isinstance(model, Mapping):
            self.path = None
            self.tensors = model
            self.shapes = {k: tuple(v.shape) for k, v in model.items()}
            self._file = None
            self.name = "state dict"
            return
        from safetensors import safe_open
        self.path = Path(model)
        self.shapes = checkpoint_shapes(self.path)
        self.name = self.path.name
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as e:   # safetensors raises its own types; the header was checked already
            raise CheckpointFileError(f"model checkpoint is unreadable: {str(e).splitlines()[0]}",
                                      file=str(self.path)) from e

    def get(self, name: str) -> Tensor:
        if self._file is None:
            return self.tensors[name]
        try:
            return self._file.get_tensor(name)
        except Exception as e:
            raise CheckpointFileError(f"cannot read tensor: {str(e).splitlines()[0]}", file=str(self.path),
                                      key=name) from e

    def keys(self) -> list:
        return list(self.shapes)


# --------------------------------------------------------------------------------------------------
# One unit: ΔW in its cheapest form, SVD, rank, what is written

@dataclass
class _Delta:
    """One unit's ΔW: factors (up (out, R) @ down (R, inner)) and/or a dense (out, inner) part, float32."""

    up: Optional[Tensor]
    down: Optional[Tensor]
    dense: Optional[Tensor]
    bias: Optional[Tensor]
    concat: bool          # every contribution is a plain LoRA (the --exact concatenation applies)
    _matrix: Optional[Tensor] = None

    @property
    def empty(self) -> bool:
        return self.up is None and self.dense is None

    @property
    def rank(self) -> int:
        return 0 if self.up is None else self.up.shape[1]

    @property
    def shape(self) -> tuple:
        return (self.up.shape[0], self.down.shape[1]) if self.up is not None else tuple(self.dense.shape)

    @property
    def factored(self) -> bool:
        """Whether the SVD runs in factor space (factors only, and cheaper there: `svd.factor_cheaper`)."""
        return self.dense is None and self.up is not None and svd.factor_cheaper(*self.shape, self.rank)

    def matrix(self) -> Tensor:
        """The dense (out, inner) ΔW (formed once)."""
        if self._matrix is None:
            if self.up is None:
                self._matrix = self.dense
            elif self.dense is None:
                self._matrix = self.up @ self.down
            else:
                self._matrix = torch.addmm(self.dense, self.up, self.down)
        return self._matrix


def _plain_lora(c: Contribution) -> bool:
    return isinstance(c.adapter, LoRA) and c.dora_scale is None


def _unit_delta(unit: _Unit, weights: Optional[_Weights], device: torch.device) -> _Delta:
    if unit.dense_source is not None:
        return _Delta(None, None, unit.dense_source(), None, False)
    rows = slice(*unit.rows) if unit.rows is not None else slice(None)
    lows, dense_items = [], []
    for it in unit.items:
        c = it.contribution
        r = factor_rank(c)
        f = factor_form(c, device) if r is not None and r < min(unit.out, unit.inner) else None
        if f is None:
            dense_items.append(it)
        else:
            lows.append(((f[0][rows], f[1]), c, it.multiplier))
    up = down = None
    if lows:
        up, down, alpha = stack_factors(lows)     # m·s folded into up where several are concatenated
        if alpha != 1.0:
            up = up * alpha
    dense = None
    if dense_items:
        needs = any(needs_weight(it.contribution) for it in dense_items)
        # The types that do not read W get an uninitialised stand-in of its shape (never read, never touched).
        base = _base_weight(unit, weights, device) if needs else torch.empty(unit.whole, device=device)
        acc = None
        for it in dense_items:
            d = it.contribution.weight_delta(base, it.multiplier)
            if d is not None:
                acc = d if acc is None else acc.add_(d)
        if acc is not None:
            dense = acc[rows].reshape(unit.out, unit.inner).contiguous()
    bias = None
    if any(it.contribution.bias_delta is not None for it in unit.items):
        b = torch.zeros(unit.whole[0], device=device)
        for it in unit.items:
            d = it.contribution.bias_change(b, it.multiplier)
            if d is not None:
                b += d
        bias = b[rows].contiguous()
    concat = not dense_items and all(_plain_lora(it.contribution) for it in unit.items)
    return _Delta(up, down, dense, bias, concat)


def _base_weight(unit: _Unit, weights: Optional[_Weights], device: torch.device) -> Tensor:
    if weights is None or unit.weight is None:   # planning refuses these without a model
        raise ExportError(f"{unit.name}: needs the base weight; give --model")
    return weights.get(unit.weight).to(device=device, dtype=torch.float32)


def _factorize(delta: _Delta, rank: Optional[int], niter: int, dtype: torch.dtype) -> svd.Factorization:
    """The unit's SVD: in factor space where cheaper, else dense (top `rank` by svd_lowrank where small)."""
    if delta.factored:
        return svd.factor_svd(delta.up.to(dtype), delta.down.to(dtype))
    return svd.dense_svd(delta.matrix().to(dtype), rank, niter)


def _spectrum(delta: _Delta) -> tuple:
    """(every singular value, ‖ΔW‖²) of one unit (size mode, pass 1)."""
    if delta.factored:
        return svd.factor_svdvals(delta.up, delta.down)
    w = delta.matrix()
    return torch.linalg.svdvals(w), float((w.double() ** 2).sum())


def _lora_tensors(unit: _Unit, up: Tensor, down: Tensor, dtype: torch.dtype, clamp: Optional[float]) -> tuple:
    """The written (cast) factors: up (out, k[, 1, 1]), down (k, in[, kh, kw]), and the same 2-D in float32."""
    if clamp is not None:
        up, down = svd.clamp_quantile(up, down, clamp)
    up_c, down_c = up.to(dtype), down.to(dtype)
    k = up.shape[1]
    conv = len(unit.shape) == 4
    up_w = up_c.reshape(unit.out, k, 1, 1) if conv else up_c       # (out, k) -> (out, k, 1, 1)
    down_w = down_c.reshape(k, *unit.shape[1:]) if conv else down_c   # (k, in·kh·kw) -> (k, in, kh, kw)
    return up_w.contiguous(), down_w.contiguous(), up_c.float(), down_c.float()


def _measured_sq(delta: _Delta, total: float, up: Tensor, down: Tensor, exact: bool) -> tuple:
    """(‖ΔW − up @ down‖_F², ‖ΔW‖_F²) of what is written (see `svd.residual_sq`, `svd.lowrank_sq_norm`).

    In factor space the error is total − 2⟨ΔW, A⟩ + ‖A‖², first with float32 products and `total` from the
    float32 SVD (each good to ~1e-7·total); where the error is below RESIDUAL_RECHECK·total, both are redone in
    float64 (‖ΔW‖² from Gram matrices)."""
    if delta.dense is None and delta.up is not None:
        if exact:
            return svd.lowrank_sq_norm(torch.cat([delta.up, -up], 1), torch.cat([delta.down, down], 0)), total
        err = svd.residual_sq(delta.up, delta.down, total, up, down)
        if err < RESIDUAL_RECHECK * total:
            total = svd.lowrank_sq_norm(delta.up, delta.down)
            err = svd.residual_sq(delta.up, delta.down, total, up, down, precise=True)
        return err, total
    w = delta.matrix()
    if exact:
        return float(((w.double() - up.double() @ down.double()) ** 2).sum()), total
    return float(((w - up @ down).double() ** 2).sum()), total


@dataclass
class _Options:
    mode: RankMode
    dtype: torch.dtype
    dtype_name: str
    device: torch.device
    clamp: Optional[float]
    niter: int

    @property
    def elsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _lora_able(unit: _Unit) -> bool:
    return len(unit.shape) > 1 and min(unit.out, unit.inner) > 1


def _write_unit(unit: _Unit, delta: _Delta, opts: _Options, rank: Optional[int], out: dict) -> Optional[UnitReport]:
    """Compute and store one unit's tensors in `out`; its report (None when its weight ΔW is zero)."""
    mode = opts.mode
    exact = mode.kind == "exact"
    if delta.bias is not None:
        out[f"{unit.name}.diff_b"] = delta.bias.to(opts.dtype).cpu()
    if delta.empty:
        return None
    if not _lora_able(unit):
        return _write_diff(unit, delta, opts, out, "a 1-D weight: written as diff")
    if exact and delta.concat:
        r = delta.rank
        total = svd.lowrank_sq_norm(delta.up, delta.down)
        if total == 0.0:
            return None
        if r * (unit.out + unit.inner) >= unit.out * unit.inner:
            return _write_diff(unit, delta, opts, out,
                               f"concatenated rank {r} is not smaller than the full ΔW: written as diff")
        up_w, down_w, up_c, down_c = _lora_tensors(unit, delta.up, delta.down, opts.dtype, None)
        err, total = _measured_sq(delta, total, up_c, down_c, True)
        return _store_lora(unit, up_w, down_w, opts, out, total, err, None, "concat")
    hint = int(mode.value) if mode.kind == "rank" else rank if mode.kind == "size" else None
    fac = _factorize(delta, hint, opts.niter, torch.float64 if exact else torch.float32)
    total = fac.total
    if total == 0.0:
        return None
    if mode.kind == "rank":
        k = min(int(mode.value), fac.numerical_rank())
    elif mode.kind == "fro":
        k = min(svd.rank_for_energy(fac.s, total, mode.value), fac.numerical_rank())
    elif mode.kind == "size":
        k = min(rank or 0, fac.s.numel())
    else:
        k = svd.rank_for_tolerance(fac.s, total, EXACT_TOL)
        if k * (unit.out + unit.inner) >= unit.out * unit.inner:
            return _write_diff(unit, delta, opts, out, f"needs rank {k} for a relative error ≤ {EXACT_TOL:g}, "
                                                       "not smaller than the full ΔW: written as diff")
    if k <= 0:
        return None
    up, down = fac.split(k)
    up_w, down_w, up_c, down_c = _lora_tensors(unit, up.float(), down.float(), opts.dtype, opts.clamp)
    err, total = _measured_sq(delta, total, up_c, down_c, exact)
    tail = fac.tail(k)
    return _store_lora(unit, up_w, down_w, opts, out, total, err, None if tail is None else math.sqrt(tail),
                       fac.method)


def _store_lora(unit: _Unit, up_w: Tensor, down_w: Tensor, opts: _Options, out: dict, total: float,
                err_sq: float, optimal: Optional[float], method: str) -> UnitReport:
    k = up_w.shape[1]
    out[f"{unit.name}.lora_up.weight"] = up_w.cpu()
    out[f"{unit.name}.lora_down.weight"] = down_w.cpu()
    out[f"{unit.name}.alpha"] = torch.tensor(float(k), dtype=up_w.dtype)     # alpha = rank: scale 1
    return UnitReport(unit.name, unit.component, unit.shape, unit.algos, "lora", k,
                      (up_w.numel() + down_w.numel()) * opts.elsize, total, math.sqrt(err_sq), optimal, method)


def _write_diff(unit: _Unit, delta: _Delta, opts: _Options, out: dict, note: str) -> Optional[UnitReport]:
    w = delta.matrix()
    total = float((w.double() ** 2).sum())
    if total == 0.0:
        return None
    wc = w.to(opts.dtype)
    err = math.sqrt(float(((w.double() - wc.double()) ** 2).sum()))
    out[f"{unit.name}.diff"] = wc.reshape(unit.shape).contiguous().cpu()
    return UnitReport(unit.name, unit.component, unit.shape, unit.algos, "diff", 0, wc.numel() * opts.elsize,
                      total, err, err, "full", note)


def _dropped(unit: _Unit, total: float, why: str) -> UnitReport:
    """A unit given rank 0 (its whole ΔW is the error)."""
    return UnitReport(unit.name, unit.component, unit.shape, unit.algos, "dropped", 0, 0, total, math.sqrt(total),
                      None, "-", why)


# --------------------------------------------------------------------------------------------------
# The driver shared by export, extract and resize

@dataclass
class _Source:
    network: Network
    request: object          # `weight(component, block, step, total)` and `dyn` (Strength, NetworkRequest)
    label: str
    info: dict


def _te_unchanged(units: list, weights: Optional[_Weights], device: torch.device, threshold: float) -> tuple:
    """(kept units, lines): the text encoders whose max |ΔW| is ≤ threshold are left out."""
    lines = []
    if threshold <= 0:
        return units, lines
    peak: dict = {}
    for u in units:
        if u.component == "unet":
            continue
        d = _unit_delta(u, weights, device)
        if d.up is not None or d.dense is not None:
            peak[u.component] = max(peak.get(u.component, 0.0), float(d.matrix().abs().max()))
        else:
            peak.setdefault(u.component, 0.0)
    skip = {c for c, p in peak.items() if p <= threshold}
    for c in sorted(skip):
        lines.append(f"{c}: text encoder unchanged (max |ΔW| {peak[c]:.3g} ≤ {threshold:g}): not written")
    return [u for u in units if u.component not in skip], lines


def _allocate(units: list, opts: _Options, weights: Optional[_Weights], progress: Optional[Progress]) -> tuple:
    """--size-mb pass 1: every unit's singular values, then water-filling. Returns ({name: rank}, {name: ‖ΔW‖²},
    lines)."""
    spectra, unit_bytes, totals = [], [], {}
    lora_units = [u for u in units if _lora_able(u)]
    for i, u in enumerate(lora_units):
        d = _unit_delta(u, weights, opts.device)
        s, total = (torch.empty(0), 0.0) if d.empty else _spectrum(d)
        spectra.append(s.cpu()[: min(u.out, u.inner)])
        totals[u.name] = total
        unit_bytes.append((u.out + u.inner) * opts.elsize)
        if progress:
            progress("spectra", i + 1, len(lora_units))
        del d
    budget = int(opts.mode.value * MB)
    if unit_bytes and budget < min(unit_bytes):
        raise ExportError(f"--size-mb {opts.mode.value:g} cannot hold rank 1 of even the smallest module "
                          f"({min(unit_bytes)} bytes in {opts.dtype_name}; 1 MB = 10^6 bytes)")
    alloc = svd.water_fill(spectra, unit_bytes, budget)
    lines = []
    full = sum(int((s > 0).sum()) * b for s, b in zip(spectra, unit_bytes))
    if alloc.bytes >= full:
        lines.append(f"the budget holds every module at full rank ({full / MB:.3f} MB)")
    return {u.name: k for u, k in zip(lora_units, alloc.ranks)}, totals, lines


def _first(names: list, n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more in --report)" if len(names) > n else "")


def _run(units: list, opts: _Options, weights: Optional[_Weights], progress: Optional[Progress]) -> tuple:
    """(tensors to write, unit reports, lines)."""
    out: dict = {}
    reports, lines = [], []
    ranks, totals = {}, {}
    if opts.mode.kind == "size":
        ranks, totals, lines = _allocate(units, opts, weights, progress)
    dropped, zero = [], []
    for i, u in enumerate(units):
        if ranks.get(u.name, 1) == 0 and totals.get(u.name, 0.0) > 0.0:
            reports.append(_dropped(u, totals[u.name], "rank 0 under the budget: left out"))
            dropped.append(u.name)
        else:
            d = _unit_delta(u, weights, opts.device)
            rep = _write_unit(u, d, opts, ranks.get(u.name), out)
            del d
            if rep is None:
                if f"{u.name}.diff_b" in out:
                    lines.append(f"{u.name}: weight ΔW is zero: only its bias delta written")
                else:
                    zero.append(u.name)
            else:
                reports.append(rep)
                if rep.note:
                    lines.append(f"{u.name}: {rep.note}")
                if opts.mode.kind == "exact" and opts.dtype == torch.float32 and rep.rel_error > EXACT_VERIFY:
                    raise ExportError(f"--exact verification failed on {u.name}: relative error "
                                      f"{rep.rel_error:.3g} > {EXACT_VERIFY:g}")
        if progress:
            progress("modules", i + 1, len(units))
    if dropped:
        lines.append(f"{len(dropped)} module(s) got rank 0 under the budget and are left out (the bytes went where "
                     f"they remove more error per byte): {_first(dropped)}")
    if zero:
        lines.append(f"{len(zero)} module(s) have a zero ΔW and are not written: {_first(zero)}")
    written = [r for r in reports if r.written != "dropped"]
    if opts.mode.kind == "exact" and opts.dtype != torch.float32 and written:
        lines.append(f"--exact in {opts.dtype_name}: rounding to {opts.dtype_name} leaves relative errors up to "
                     f"{max(r.rel_error for r in written):.3g} (fp32 keeps them ≤ {EXACT_VERIFY:g})")
    if not written and not out:
        raise ExportError("nothing to write: every module's ΔW is zero (strength 0, or identical checkpoints)")
    return out, reports, lines


def _metadata(report: ExportReport, base: dict, base_model: Optional[str]) -> dict:
    """The output's metadata: `base` (resize: the input's training metadata) with the kohya `ss_*`, ModelSpec
    and `lycoris_export` keys of this run (see docs/export.md)."""
    md = dict(base)
    ranks = sorted({u.rank for u in report.units if u.written == "lora"})
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    arch = report.arch
    md.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,        # alpha = rank in every module: scale 1
        "ss_output_name": Path(report.output).stem,
        "ss_training_comment": f"lib_lycoris {report.kind} ({report.mode.describe()}), retained energy "
                               f"{report.retained:.6f}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": Path(report.output).stem,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": f"lib_lycoris {report.kind} of {', '.join(s['name'] for s in report.sources)}",
    })
    if arch in _SS_BASE:
        md["ss_base_model_version"] = _SS_BASE[arch]
        md["ss_v2"] = str(arch == "sd2")
        md["modelspec.architecture"] = _MODELSPEC_ARCH[arch] + "/lora"
        md["modelspec.implementation"] = _MODELSPEC_IMPL[arch]
    if base_model:
        md["ss_sd_model_name"] = base_model
    md["lycoris_export"] = json.dumps({
        "kind": report.kind, "mode": report.mode.to_dict(), "dtype": report.dtype,
        "base_model": {"arch": arch, "checkpoint": base_model},
        "sources": report.sources, "retained_energy": report.retained, "max_rel_error": report.max_rel_error,
        "modules": len(report.written), "diff_modules": sum(u.written == "diff" for u in report.units),
        "lora_bytes": report.lora_bytes}, ensure_ascii=False)
    md["lycoris_export_rank_mode"] = report.mode.describe()
    md["lycoris_export_retained_energy"] = f"{report.retained:.6f}"
    return {k: str(v) for k, v in md.items()}


def _options(mode: RankMode, dtype: Optional[str], device: Optional[str], clamp: Optional[float],
             niter: int) -> _Options:
    name = dtype or ("fp32" if mode.kind == "exact" else "fp16")
    if name not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if clamp is not None and not 0.0 < clamp < 1.0:
        raise ExportError(f"--clamp-quantile must be in (0, 1), not {clamp:g}")
    if niter < 0:
        raise ExportError(f"--niter must be ≥ 0, not {niter}")
    if clamp is not None and mode.kind == "exact":
        raise ExportError("--clamp-quantile cannot go with --exact (clamping changes the weights)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _Options(mode, DTYPES[name], name, dev, clamp, niter)


def _export(kind: str, sources: list, output: PathLike, mode: RankMode, *, model=None, dtype=None, device=None,
            clamp_quantile=None, te_min_diff: float = 0.0, niter: int = svd.NITER, strict: bool = True,
            step: tuple = (1, 1), progress: Optional[Progress] = None, base_metadata: Optional[dict] = None,
            units_arch: Optional[tuple] = None, base_name: Optional[str] = None) -> ExportReport:
    start = time.perf_counter()
    opts = _options(mode, dtype, device, clamp_quantile, niter)
    with CheckpointWriter(output) as writer:          # an unwritable output fails here, before any work
        weights = _Weights(model) if model is not None else None
        planned = []
        if units_arch is not None:
            units, arch = units_arch
        elif weights is not None:
            units, arch, planned = _plan_model(sources, weights.shapes, step, strict)
        else:
            units, arch = _plan_bare(sources, step)
        units, lines = _te_unchanged(units, weights, opts.device, te_min_diff)
        lines = planned + lines
        present = {m.component for s in sources for m in s.network.modules.values()}
        for comp in sorted(present - {u.component for u in units} - {"unet"}):
            if not any(comp in line for line in lines):
                lines.append(f"{comp}: strength 0 in every input: not written")
        if not units:
            raise ExportError("nothing to export: every module has strength 0 (or is an unchanged text encoder)")
        tensors, reports, more = _run(units, opts, weights, progress)
        report = ExportReport(output=str(output), kind=kind, mode=mode, dtype=opts.dtype_name, units=reports,
                              lines=lines + more, sources=[s.info for s in sources], arch=arch)
        md = _metadata(report, base_metadata or {}, base_name or (weights.name if weights else None))
        writer.write(tensors, md)
    report.seconds = time.perf_counter() - start
    return report


def _source_info(network: Network, strength: dict) -> dict:
    path = Path(network.path)
    info = {"name": network.name, "file": path.name, "base_model": network.base_model, **strength}
    try:
        info["sha256"] = addnet_hash(path)
    except OSError as e:
        log.warning("could not hash %s: %s", path, e.strerror or e)
    return info


# --------------------------------------------------------------------------------------------------
# Public API

class AtStep:
    """A tag's request evaluated at one step of `total` (a per-step schedule exported at the step a user names)."""

    def __init__(self, request, step: int, total: int) -> None:
        self.request, self.step, self.total = request, step, total
        self.dyn = getattr(request, "dyn", None)

    def weight(self, component: str, block: Optional[str], step: int, total_steps: int, hires: bool = False) -> float:
        return self.request.weight(component, block, self.step, self.total)


def export_networks(networks: Sequence[tuple], output: PathLike, mode: RankMode, *,
                    model: Union[PathLike, Mapping[str, Tensor], None] = None, dtype: Optional[str] = None,
                    device: Optional[str] = None, clamp_quantile: Optional[float] = None, te_min_diff: float = 0.0,
                    niter: int = svd.NITER, strict: bool = True, progress: Optional[Progress] = None,
                    model_name: Optional[str] = None) -> ExportReport:
    """Write one LoRA/LoCon approximating Σ m_i·ΔW_i of (Network, request) pairs to `output` (see module doc).

    Args:
        networks: (Network, request) pairs; request: `patcher.Strength`, `tags.NetworkRequest` (constant in
            steps: wrap a scheduled one in `AtStep`) or anything with `weight(component, block, step, total)`.
        model: base checkpoint (.safetensors path) or its unpatched state dict: module names and shapes are
            then the model's, and DoRA/OFT/BOFT/IA3/GLoRA inputs become possible.
        dtype: 'fp16' | 'bf16' | 'fp32' (default fp16; fp32 with --exact).
        te_min_diff: leave out a text encoder whose max |ΔW| is at most this (0: only if unchanged).
        strict: refuse modules the model lacks or does not fit (PartialMergeError), as `merge`.
        progress: called (stage, done, total) per unit; stage 'spectra' (size mode, pass 1) or 'modules'.
        model_name: the base model's name in the metadata (`ss_sd_model_name`; default: the checkpoint's file
            name, or 'state dict' for a state dict).
    Returns: the ExportReport (also for the metadata written).
    Raises: LycorisError subclasses naming the file; nothing is written then.
    """
    sources = []
    for net, req in networks:
        if hasattr(req, "is_scheduled") and req.is_scheduled():
            raise ExportError(f"{req.source or req.name}: its weight changes from step to step (a schedule or "
                              "start/stop); name the step to export (--step S --steps N)", file=str(net.path))
        sources.append(_Source(net, req, net.name, _source_info(net, _strength_info(req))))
    return _export("export", sources, output, mode, model=model, dtype=dtype, device=device,
                   clamp_quantile=clamp_quantile, te_min_diff=te_min_diff, niter=niter, strict=strict,
                   progress=progress, base_name=model_name)


def _strength_info(req) -> dict:
    from .tags import NetworkRequest, format_request
    if isinstance(req, AtStep):
        return {**_strength_info(req.request), "step": req.step, "steps": req.total}
    if isinstance(req, NetworkRequest):
        return {"tag": format_request(req)}
    if isinstance(req, Strength):
        return {"te": req.te, "unet": req.te if req.unet is None else req.unet}
    return {}


def export_prompt(prompt: str, networks, output: PathLike, mode: RankMode, *, step: Optional[int] = None,
                  total_steps: Optional[int] = None, **kwargs) -> ExportReport:
    """Export exactly what a prompt's `<lora:…>`/`<lyco:…>` tags apply (te/unet, in/mid/out and LBW block
    weights, dyn), names resolved as the WebUI resolves them. This is the call behind the WebUI's "Export
    LoRA" action.

    Args:
        prompt: the prompt (text outside the tags is ignored).
        networks: a `names.NetworkIndex`, or the networks folders to index.
        step, total_steps: the step whose weights to export; required when a tag's weight changes per step
            (a schedule, start/stop), refused otherwise.
        kwargs: as `export_networks` (model: the checkpoint path or its unpatched state dict, which block weights
            need where the networks do not state their base model; dtype, device, progress, …).
    """
    from .names import NetworkIndex
    from .tags import parse_prompt
    parsed = parse_prompt(prompt)
    if parsed.warnings:   # a generation goes on with the fallback and shows it; a file would keep it silently
        raise ExportError(f"{'; '.join(parsed.warnings)}. An export takes the tags exactly as written: fix "
                          f"{'it' if len(parsed.warnings) == 1 else 'them'} first", key=prompt[:80])
    if not parsed.requests:
        raise ExportError("the prompt has no <lora:…> or <lyco:…> tag", key=prompt[:80])
    if (step is None) != (total_steps is None):
        raise ExportError("--step and --steps go together (the step to export, of how many)")
    if step is not None and not 1 <= step <= total_steps:
        raise ExportError(f"--step {step} is outside 1..{total_steps}")
    index = networks if isinstance(networks, NetworkIndex) else NetworkIndex(list(networks))
    pairs = []
    for req in parsed.requests:
        path = index.resolve(req.name)
        pairs.append((load_network(path, name=req.name), AtStep(req, step, total_steps) if step else req))
    return export_networks(pairs, output, mode, **kwargs)


def resize_network(path: PathLike, output: PathLike, mode: RankMode, **kwargs) -> ExportReport:
    """Re-rank one network (any type; usually a LoRA made smaller), keeping its training metadata. Other
    arguments: `export_networks`."""
    net = load_network(path)
    src = _Source(net, Strength(1.0), net.name, _source_info(net, {"te": 1.0, "unet": 1.0}))
    keys = {k: v for k, v in net.metadata.items() if not k.startswith(("lycoris_export", "sshs_"))}
    return _export("resize", [src], output, mode, base_metadata=keys, **kwargs)


def extract_checkpoint(tuned: PathLike, base: PathLike, output: PathLike, mode: RankMode, *,
                       te_min_diff: float = TE_MIN_DIFF_EXTRACT, **kwargs) -> ExportReport:
    """A LoRA/LoCon of tuned − base over every Linear and Conv weight (not embeddings, norms or biases: as kohya
    `extract_lora_from_models.py`); both .safetensors checkpoints in the same layout. The text encoders are
    left out where max |ΔW| ≤ te_min_diff (kohya's --min_diff). Other arguments: `export_networks` (no model)."""
    if mode.kind == "exact":
        raise ExportError("extract has no --exact mode: a fine-tune's ΔW is full rank (use --fro 1)")
    if "model" in kwargs:
        raise ExportError("extract reads its base weights from BASE; no --model")
    dev = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    tw, bw = _Weights(tuned), _Weights(base)
    mm = ModelMap.from_state_dict(bw.shapes)
    if mm.arch == "unknown" and not mm.targets:
        raise ExportError("BASE holds no model weights this tool knows", file=str(base))
    prefixes = _te_prefix(mm.arch, mm.components)
    units = []
    missing, misfit = [], []
    for t in mm.targets:
        if t.kind not in ("linear", "conv") or _EMBEDDING.search(t.module + "."):
            continue
        if t.weight not in tw.shapes:
            missing.append(t.weight)
            continue
        if tuple(tw.shapes[t.weight]) != tuple(t.weight_shape or t.shape):
            misfit.append(f"{t.weight} {tuple(tw.shapes[t.weight])} vs {tuple(t.weight_shape or t.shape)}")
            continue

        def load(t: Target = t) -> Tensor:
            d = tw.get(t.weight).to(dev, torch.float32) - bw.get(t.weight).to(dev, torch.float32)
            if t.rows is not None:
                d = d[t.rows[0]:t.rows[1]]
            return d.reshape(t.shape[0], -1)
        units.append(_Unit(name=output_name(t, mm.arch, prefixes), component=t.component, shape=tuple(t.shape),
                           whole=tuple(t.weight_shape or t.shape), rows=t.rows, weight=t.weight, bias=t.bias,
                           dense_source=load))
    if missing or misfit:
        what = (f"{len(missing)} weight(s) of BASE are not in TUNED (first: {missing[0]})" if missing else
                f"{len(misfit)} weight(s) differ in shape (first: {misfit[0]})")
        raise ExportError(f"TUNED and BASE must be the same model in the same layout: {what}", file=str(tuned))
    if not units:
        raise ExportError("no Linear or Conv weight to extract", file=str(base))
    info = [{"name": Path(tuned).stem, "file": Path(tuned).name, "role": "tuned", "sha256": addnet_hash(tuned)},
            {"name": Path(base).stem, "file": Path(base).name, "role": "base", "sha256": addnet_hash(base)}]
    sources = [_Source(_Placeholder(Path(tuned)), Strength(1.0), "tuned", info[0]),
               _Source(_Placeholder(Path(base)), Strength(1.0), "base", info[1])]
    return _export("extract", sources, output, mode, units_arch=(units, mm.arch), te_min_diff=te_min_diff,
                   base_name=Path(base).name, **kwargs)


@dataclass
class _Placeholder:
    """A checkpoint standing where a network stands in `_Source` (extract): a path and no modules."""

    path: Path
    modules: dict = field(default_factory=dict)
    name: str = ""
