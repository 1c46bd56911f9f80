"""The one stateful object: applies networks to a live torch model and keeps it right at every step.

    patcher = Patcher(model)                       # or Patcher.from_components({'unet': ..., 'te1': ...})
    patcher.apply([(network, request), ...])       # model = base + requested networks at `step`
    patcher.set_step(step, total)                  # scheduled multipliers move; only changed weights touched
    patcher.restore()                              # the original bits back (torch.equal on every tensor)
    patcher.park()                                 # or: end of a generation, networks left in the weights

State per touched weight ("slot"): the original tensor (backup), the contributions of the networks on it
and the multipliers now in the weight. A slot's weight is always a pure function of its backup and its
(contribution, multiplier) list:

    W = cast(backup + Σ_i (W'_i(m_i) − backup))

computed in float32 on the weight's device, so a change never accumulates rounding (no W += Δm·ΔW
drift in fp16/bf16), a rollback after a failure half-way recomputes the exact previous bits, and
`restore` copies the backup back. Plain LoRA contributions (most files) take one GEMM per slot: the
factors of all networks on the slot are concatenated along the rank, scaled by m·s, and
`W.copy_(backup); W.addmm_(up_cat, down_cat)` (no full-size temporaries for fp32 weights; fp16/bf16 ones
sum in a reused float32 buffer); where the weight holds the original bits (a first apply) the copy is
skipped. Each network's contributions and its factors converted for the weights' device and dtype are
built once per (network, model) (`_Compiled`) and kept across `restore` while the same set comes back.
A slot with one plain-LoRA network keeps, from its first write, what the next one needs (its "lane":
backup view, factors, scale), so a strength change or step switch there is `write_lora` alone, two
tensor ops, with the same bits. A rollback also covers networks the failing apply drops: their
contributions stay on the slot (`retired`) while the weight still holds them.

Per generation, not per step or module: `apply` first runs `verify`, which checks in one batched gather
(`sample_bits`: 16 elements' bits per weight, one `cat` per element size) the kept backups and, after
`park`, the weights left patched; `set_step` only compares each slot's multipliers and rewrites those
that changed. `park` is how a host makes the same set again free: the networks stay in the weights
between generations, and the next apply writes nothing if nothing changed. A parked weight that someone
else rewrote since (a checkpoint loaded into the same tensors: same storage with a new version counter,
or other bits, shape or dtype) is forgotten without a write and its networks applied to its new value;
a tensor the host only moved to other storage with the same bits stays ours.

Backups (memory, for the weights networks touch), made on a weight's first write:
- backup='device' (default): a copy on the weight's own device: + the touched weights' size there.
- backup='cpu': a copy in (pinned, on CUDA) host memory: no extra device memory; each re-patch reads
  the backup over the bus.
With keep_backups (default on CPU, where fresh memory costs page faults) `restore` keeps the backups,
as A1111 keeps its weight backups for the life of the model, so the next apply writes in place without
copying again (+ the touched weights' size held until `release_backups()`). A kept backup is used only
while the parameter is provably untouched since our restore (same storage, same autograd version
counter, which every in-place write through the parameter bumps, and equal sample elements); else it is
dropped and the weight backed up anew. The parameters' tensors are never replaced (`param.data` keeps
its storage), so hosts that hold references to them are unaffected. LoHa's two full-size products and
an fp16/bf16 weight's float32 sum go into reused scratch buffers (each the largest touched weight in
float32, made when first needed).

Modes per network: 'merge' writes weights; 'bypass' adds m·s·h(x) to the module's output with a removable
forward hook (no weight written; for networks whose multiplier changes every step, or quantized weights).
A multiplier of exactly 0 switches a network off on a weight (also for DoRA, whose LyCORIS formula
would otherwise leave W + s·ΔW at m = 0). The hook computes in the input's dtype and adds in the output's;
a LoRA's strength is folded into its small `up` factor, and the ΔW of the other types is cached once per
network (times m in the forward where W' − W is linear in m), so a scheduled multiplier costs no rewrite.

Low-bit weights (`lowbit_of`): float8 storage (A1111's "FP8 weight", Forge's fp8), tensor subclasses
(bitsandbytes `Params4bit`, Forge's `ParameterGGUF`, ComfyUI-GGUF's `GGMLTensor`, any other) and any
dtype the write path does not round into (uint8/int8 packed storage). `write_weight` would round
backup + ΔW to nearest there (in e4m3 that misses a ΔW of 3.5 % of ‖W‖ by 60–90 % of its norm at SDXL's
shapes; bench/lowbit.py) or write garbage into packed bits, so those weights are never written that way.
Per weight, whatever the mode asked:
- lowbit='bypass' (default): the forward hook above; the stored weights are never touched (restore has
  nothing to undo, nothing is re-quantised), networks stack exactly, a schedule costs nothing. Costs: per
  forward, two thin GEMMs per LoRA (r·(1/in + 1/out) of the layer's FLOPs: 2.5–5 % at rank 16 on SDXL's
  widths; bench/lowbit.py) and its factors in the compute dtype; for the other types, one cached ΔW per
  network in the compute dtype (full size: the memory a merge would not need), made from a float32
  copy of the dequantised weight where the type reads it (DoRA, OFT/BOFT, IA3, GLoRA): `w.float()`
  for fp8; for a subclass its `dequantize()` or `dequantize_as_pytorch_parameter()` method, or the
  Patcher's `dequantize` callable (the host's own, e.g. bitsandbytes' `dequantize_4bit` for Params4bit,
  which has no such method); with none of these, those modules are skipped with the reason in
  `ApplyStats.skipped` / `warnings()` (LoRA, LoHa, LoKr and full diffs never need the weight).
- lowbit='stochastic' (fp8 only, networks in 'merge' mode): W' is computed in float32 from the fp8 backup
  and rounded up or down at random with the probabilities that make E[W'] = W + ΔW (`stochastic_round`,
  as ComfyUI's `comfy/float.py` does), seeded per weight from its name and `lowbit_seed`, so an image is
  reproducible (on one device type). Costs: the backup (fp8 bits, so restore stays bit-exact) and a
  rewrite on each strength change, like any merge; keeps the plain forward speed. Unbiased, not exact:
  each weight carries zero-mean noise of up to one fp8 step, which for a ΔW of 3.5 % of ‖W‖ in e4m3 is
  as large as ΔW itself (bench/lowbit.py). Networks in 'bypass' mode and other low-bit weights stay in
  bypass.
A low-bit weight whose module the hook cannot reach (a norm; MultiheadAttention's out_proj, whose weight
MHA reads without calling its forward, so a float one there is merged even in 'bypass' mode) is skipped
with its reason. A mixed model thus merges its float weights and bypasses
its low-bit ones in one apply, and nothing here raises because a weight is low-bit: problems are reported
(`ApplyStats.warnings()`, and `runtime_warnings` for a dequantiser failing inside a forward, which drops
that network on that module and logs one WARNING).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from .blocks import ARCHS, BlockMapError, block_id
from .compose import Contribution, merged_bias
from .modelmap import ModelMap, Target
from .network import Binding, LoadReport, Network, bind

log = logging.getLogger("lycoris")

Tensor = torch.Tensor
MODES = ("merge", "bypass")
BACKUPS = ("device", "cpu")
COMPUTES = ("float32", "weight")
LOWBITS = ("bypass", "stochastic")

# The dtypes `write_weight` rounds into correctly (one rounding from float32); any other is low-bit.
WRITABLE_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
# Sign-magnitude float8 formats: `w.float()` dequantises them and `stochastic_round` works on their codes.
FP8_DTYPES = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                   "float8_e5m2fnuz") if hasattr(torch, n))
# Methods a quantised tensor subclass offers for a float copy of itself (Forge's ParameterGGUF has the second).
DEQUANTIZE_METHODS = ("dequantize", "dequantize_as_pytorch_parameter")
# Exceptions a host's dequantiser may raise inside a forward: caught there, reported, that network dropped.
DEQUANTIZE_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError)


@dataclass(frozen=True)
class LowBit:
    """Why a weight is not written by `write_weight`, and whether a float copy of it can be had."""

    kind: str                  # 'fp8' | 'subclass' (a tensor subclass) | 'packed' (an integer or other dtype)
    label: str                 # for reports: 'float8_e4m3fn', 'Params4bit (torch.uint8 storage)', ...
    dequantizable: bool        # `dequantized` can give its float32 value


def _dequantize_method(t: Tensor) -> Optional[Callable[[], Tensor]]:
    """A subclass's own dequantiser (torch.Tensor.dequantize itself is for torch's quantized dtypes)."""
    for name in DEQUANTIZE_METHODS:
        impl = getattr(type(t), name, None)
        if impl is not None and impl is not getattr(torch.Tensor, name, None):
            return getattr(t, name)
    return None


def lowbit_of(t: Tensor, dequantize: Optional[Callable[[Tensor], Tensor]] = None) -> Optional[LowBit]:
    """None for a plain tensor of a dtype `write_weight` handles; else what makes `t` low-bit.

    dequantize: the host's dequantiser for subclasses and packed dtypes (see `Patcher`)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return LowBit("subclass", f"{type(t).__name__} ({t.dtype} storage)",
                      dequantize is not None or _dequantize_method(t) is not None)
    if t.dtype in WRITABLE_DTYPES:
        return None
    if t.dtype in FP8_DTYPES:
        return LowBit("fp8", str(t.dtype).replace("torch.", ""), True)
    return LowBit("packed", f"{t.dtype} storage", dequantize is not None)


def logical_shape(t: Tensor) -> tuple:
    """The shape a weight has for the model: bitsandbytes' Params4bit stores packed (n/2, 1) bytes and keeps
    the real shape in `quant_state.shape`; GGUF subclasses override `shape` themselves."""
    qs = getattr(t, "quant_state", None)
    shape = getattr(qs, "shape", None) if qs is not None else None
    return tuple(shape) if shape is not None else tuple(t.shape)


def dequantized(t: Tensor, device: torch.device, dequantize: Optional[Callable[[Tensor], Tensor]] = None
                ) -> Optional[Tensor]:
    """A float32 copy of the low-bit weight `t` in its logical shape on `device` (None: no way to get one)."""
    lb = lowbit_of(t, dequantize)
    if lb is None or lb.kind == "fp8":
        out = t.detach().to(device).float()
    else:
        # the tensor's own method first: a host's dequantiser is for the types without one (Forge passes
        # bitsandbytes' dequantize_4bit, which fails on its GGUF parameters)
        method = _dequantize_method(t) if lb.kind == "subclass" else None
        if method is not None:
            out = method()
        elif dequantize is not None:
            out = dequantize(t)
        else:
            return None
        if type(out) is not torch.Tensor:
            out = out.detach().as_subclass(torch.Tensor)
        out = out.to(device=device, dtype=torch.float32)
    return out.reshape(logical_shape(t))


def weight_seed(name: str, seed: int) -> int:
    """The stochastic-rounding seed of one weight: a stable hash of (user seed, weight name), not Python's
    per-process `hash`, so the same image comes out in another session."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stochastic_round(x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """x (float32) in the float8 `dtype`, rounded to one of its two neighbours q0 (nearest) and q1 at random,
    to q1 with probability (x − q0)/(q1 − q0), so that E[result] = x (unbiased; values beyond the format's
    range are clamped to ±max first). The same x and seed give the same bits on one device type.

    The codes of these formats are sign-magnitude, so q1 is the code whose magnitude bits are one more (x
    beyond q0) or one less (x inside q0) than q0's, with x's sign; magnitude 0 is +0 (fnuz formats have no
    −0). Follows the idea of ComfyUI `comfy/float.py` (stochastic_rounding), on the codes instead of
    re-deriving exponent and mantissa.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"stochastic rounding covers {sorted(str(d) for d in FP8_DTYPES)}, not {dtype}")
    fmax = torch.finfo(dtype).max
    x = x.float().clamp(-fmax, fmax)
    near = x.to(dtype)
    q0 = near.float()
    code = near.view(torch.uint8).to(torch.int16)
    away = x.abs() > q0.abs()                                         # q1 has the larger magnitude
    mag = ((code & 0x7F) + torch.where(away, 1, -1)).clamp_(min=0)    # x == q0 == 0: never picked (p = 0)
    sign = torch.where(x < 0, 0x80, 0).to(torch.int16)
    other = torch.where(mag == 0, 0, sign | mag)
    q1 = other.to(torch.uint8).view(dtype).float()
    p = (x - q0) / (q1 - q0)                                         # in [0, 1/2]; 0 where x is a code
    gen = torch.Generator(device=x.device).manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, device=x.device)
    return torch.where(u < p, other, code).to(torch.uint8).view(dtype)


class WeightRequest(Protocol):
    """What the Patcher needs of a request (tags.NetworkRequest implements it)."""

    name: str
    dyn: Optional[int]

    def weight(self, component: str, block: Optional[str], step: int, total_steps: int,
               hires: bool = False) -> float: ...


@dataclass(frozen=True)
class Strength:
    """A constant request: `te` on text encoders, `unet` on the UNet (used by `merge` and tests)."""

    te: float = 1.0
    unet: Optional[float] = None
    name: str = ""
    dyn: Optional[int] = None

    def weight(self, component: str, block: Optional[str], step: int, total_steps: int,
               hires: bool = False) -> float:
        if component == "unet":
            return self.te if self.unet is None else self.unet
        return self.te


@dataclass
class _Active:
    key: tuple                 # (id(network), dyn, mode)
    network: Network
    request: WeightRequest
    binding: Binding
    mode: str


@dataclass
class _Compiled:
    """One active network's per-weight data, built once per (network, model) and kept across `restore` while
    the same set comes back (the hosts restore after every image): its contributions, and its LoRA factors
    converted for the weights' devices and dtypes."""

    network: Network
    contribs: list                                  # [(Target, module body, Contribution)]
    factors: dict = field(default_factory=dict)     # (weight name, body, device, dtype) -> (up, down) or None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.factors.values() if f is not None for t in f)


@dataclass
class _Slot:
    target: Target             # the whole weight (a row slice or swapped view of it is a contribution's `place`)
    param: Tensor              # the live full parameter (its .data is written)
    bias_param: Optional[Tensor]
    group: tuple               # (component, block) for multiplier lookup
    lowbit: Optional[LowBit] = None            # set: never written by plain rounding (module doc)
    backup: Optional[Tensor] = None            # a copy of the original bits
    bias_backup: Optional[Tensor] = None
    contribs: dict = field(default_factory=dict)    # (active key, module body) -> Contribution
    applied: tuple = ()        # (((key, body), m), ...) now in the weight (merge mode)
    routes: Optional[list] = None   # [((key, body), 'merge' | 'bypass' | 'skip', reason)], cached per contribs
    # from routes: the merge and bypass entries' (key, body); sig = (group, their active keys): slots with one
    # sig share their multipliers; ms: the multipliers now in the weight and hook (None: recompute)
    merge_keys: tuple = ()
    bypass_keys: tuple = ()
    sig: tuple = ()
    ms: Optional[tuple] = None
    sealed: Optional[tuple] = None   # `park`: (data_ptr, version, sample bits) of the weight as written
    # one plain-LoRA network merged in place: what its next write needs, so a strength change or step
    # switch costs two tensor ops (`write_lora`): (key, (dtype, shape, device) of the weight, backup,
    # backup as (rows, cols), up, down, scale); dropped whenever the routes are recomputed (`_route_slot`)
    lane: Optional[tuple] = None
    live: bool = False         # param and bias_param were looked up in this apply (`_route_slot` needn't)
    # contributions of networks dropped from the set while `applied` still holds them: a rollback of the
    # apply that drops them writes them back (kept until `applied` no longer names them)
    retired: dict = field(default_factory=dict)

    def forget(self, key: tuple) -> None:
        """Drop a network's contributions (every module of it on this weight)."""
        held = {k for k, _ in self.applied}
        self.retired.update((k, c) for k, c in self.contribs.items() if k[0] == key and k in held)
        self.contribs = {k: c for k, c in self.contribs.items() if k[0] != key}
        self.routes = self.ms = None

    def contribution(self, k: tuple) -> Contribution:
        """The contribution (key, body) names: an active one, or a retired one still in the weight."""
        c = self.contribs.get(k)
        return c if c is not None else self.retired[k]

    def view(self) -> Tensor:
        return self.param.data

    def bias_view(self) -> Optional[Tensor]:
        return None if self.bias_param is None else self.bias_param.data


SAMPLES = 16               # elements per weight in the staleness samples (first and last included)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _version(t: Tensor) -> Optional[int]:
    """The autograd version counter; None for inference tensors (Forge builds its models under
    torch.inference_mode()), which have none: storage and samples must then prove it alone."""
    return None if t.is_inference() else t._version


def _sample_views(t: Tensor) -> list:
    """A view of SAMPLES evenly spaced elements of `t` as raw bits, ending at the last (no copy for a
    contiguous tensor; two tensor ops). Bits, not values: NaN and −0 compare as stored."""
    if not t.is_contiguous():
        t = t.contiguous()
    bits = (t.detach() if t.requires_grad else t).view(_BITS[t.element_size()])
    n = bits.numel()
    if n <= SAMPLES:
        return [bits.reshape(-1)]
    step = (n - 1) // (SAMPLES - 1)       # integer: exact at any size
    start = n - 1 - (SAMPLES - 1) * step  # < step: the first sample is among the first `step` elements
    return [bits.as_strided((SAMPLES,), (step,), bits.storage_offset() + start)]


def sample_bits(tensors: Sequence[Tensor]) -> list:
    """Per tensor, the bits of its SAMPLES elements on the CPU, gathered with one `cat` and one copy per
    (device, element size): checking 800 weights costs a few ops, not a few per weight."""
    out: list = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.element_size()), []).append(i)
    for idx in groups.values():
        views = [_sample_views(tensors[i]) for i in idx]
        flat = torch.cat([v for vs in views for v in vs]).cpu()
        for i, part in zip(idx, flat.split([sum(v.numel() for v in vs) for vs in views])):
            out[i] = part
    return out


def equal_bits(pairs: Sequence[tuple]) -> list:
    """Per (a, b) pair of 1-D sample-bit tensors, whether they are equal: one `cat` and compare per dtype
    where all of them are (the usual case), pair by pair only in a group that differs."""
    out = [False] * len(pairs)
    groups: dict = {}
    for i, (a, b) in enumerate(pairs):
        if a.dtype == b.dtype and a.numel() == b.numel():
            groups.setdefault(a.dtype, []).append(i)
    for idx in groups.values():
        if torch.equal(torch.cat([pairs[i][0] for i in idx]), torch.cat([pairs[i][1] for i in idx])):
            for i in idx:
                out[i] = True
        else:
            for i in idx:
                out[i] = torch.equal(pairs[i][0], pairs[i][1])
    return out


@dataclass
class _Kept:
    """A weight backup kept after `restore`, with what proves the parameter untouched since: same storage,
    same autograd version counter (every in-place write through the parameter bumps it), equal sample bits."""

    backup: Tensor
    data_ptr: int
    version: Optional[int]
    sample: Optional[Tensor] = None   # the weight's sample bits when kept (filled in one batch: `_seal_kept`)
    verified: bool = True             # checked since the last generation boundary (`restore`, `park`)

    @classmethod
    def of(cls, slot: "_Slot") -> "_Kept":
        return cls(slot.backup, slot.param.data_ptr(), _version(slot.param))

    def same_tensor(self, param: Tensor) -> bool:
        return (param.data_ptr() == self.data_ptr and _version(param) == self.version
                and param.shape == self.backup.shape and param.dtype == self.backup.dtype)

    def holds(self, param: Tensor, bits: Tensor) -> bool:
        """`param` (its sample bits now: `bits`) is provably untouched since this backup was kept."""
        return self.sample is not None and self.same_tensor(param) and torch.equal(bits, self.sample)


@dataclass
class ApplyStats:
    networks: int = 0
    slots_written: int = 0
    load_s: float = 0.0        # reading files (measured by the caller, e.g. Runtime)
    bind_s: float = 0.0
    write_s: float = 0.0
    reports: list = field(default_factory=list)
    lowbit_bypass: int = 0     # low-bit weights reached through forward hooks (never written)
    lowbit_stochastic: int = 0  # fp8 weights merged with stochastic rounding (lowbit='stochastic')
    skipped: list = field(default_factory=list)    # (network name, weight name, reason): not applied there

    def line(self) -> str:
        s = (f"applied {self.networks} network(s): {self.slots_written} weights written; "
             f"load {self.load_s * 1e3:.1f} ms, bind {self.bind_s * 1e3:.1f} ms, "
             f"compute+write {self.write_s * 1e3:.1f} ms")
        if self.lowbit_bypass or self.lowbit_stochastic:
            s += (f"; low-bit weights: {self.lowbit_bypass} in bypass, "
                  f"{self.lowbit_stochastic} merged with stochastic rounding")
        return s

    def warnings(self) -> list:
        """One line per network and reason for the modules it could not act on (low-bit weights)."""
        groups: dict = {}
        for network, weight, reason in self.skipped:
            groups.setdefault((network, reason), []).append(weight)
        return [f"{network}: {len(ws)} module(s) not applied ({reason}; e.g. {ws[0]})"
                for (network, reason), ws in groups.items()]


class Patcher:
    """Applies networks to one model; see the module docstring for the contract."""

    def __init__(self, model: torch.nn.Module, *, modelmap: Optional[ModelMap] = None,
                 backup: str = "device", compute: str = "float32", keep_backups: Optional[bool] = None,
                 named_params: Optional[Mapping[str, Tensor]] = None,
                 modules: Optional[Mapping[str, torch.nn.Module]] = None,
                 lowbit: str = "bypass", lowbit_seed: int = 0,
                 dequantize: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """Args: model: the root module (names as in `modelmap`); backup: 'device' | 'cpu' (see module
        doc); compute: 'float32' (deltas in float32, one rounding to the weight's dtype) or 'weight' (LoRA
        GEMMs in the weight's dtype with float32 accumulation: one pass fewer for fp16/bf16 weights);
        keep_backups: keep weight backups after `restore` for the next apply (None: where the backup
        is in host memory, i.e. on CPU or with backup='cpu'); lowbit: what networks in 'merge' mode do on
        fp8 weights, 'bypass' (exact) or 'stochastic' (merged with stochastic rounding; see module doc);
        lowbit_seed: the user part of the per-weight rounding seed (weights written after a change use
        the new one); dequantize: the host's dequantiser, tensor -> float tensor of the logical shape, for
        low-bit subclasses without a `dequantize()` method (only called where a type needs the weight)."""
        if backup not in BACKUPS:
            raise ValueError(f"backup must be one of {BACKUPS}")
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}")
        if lowbit not in LOWBITS:
            raise ValueError(f"lowbit must be one of {LOWBITS}")
        self.compute = compute
        self.lowbit = lowbit
        self.lowbit_seed = lowbit_seed
        self.dequantize = dequantize
        self.model = model
        # logical shapes: a packed 4-bit weight must bind by the shape its module computes with
        self.modelmap = modelmap or ModelMap.from_state_dict(
            {n: logical_shape(p) for n, p in model.named_parameters()})
        self.backup_where = backup
        self._params = dict(named_params) if named_params is not None else dict(model.named_parameters())
        self._modules = dict(modules) if modules is not None else dict(model.named_modules())
        self._bindings: dict = {}          # id(network) -> Binding
        self._active: dict = {}            # key -> _Active
        self._slots: dict = {}             # weight name -> _Slot
        self._hooks: dict = {}             # module name -> _BypassHook
        self._kept: dict = {}              # weight name -> _Kept, backups kept after restore
        self._compiled: dict = {}          # key -> _Compiled, of the active (or last restored) set
        self._work: dict = {}              # (device, slot 0-2) -> flat float32 scratch buffer
        self._static: dict = {}            # weight name -> (whole-weight Target, (component, block)): fixed
        self.keep_backups = keep_backups
        self._skipped: list = []           # (network name, weight, reason): by the last apply
        self.runtime_warnings: list = []   # problems met inside forwards (a dequantiser failing): hosts read
                                           # them after a generation and may clear the list
        self.step = 1
        self.total = 1
        self.hires = False

    @classmethod
    def from_components(cls, components: Mapping[str, torch.nn.Module], **kw) -> "Patcher":
        """For hosts that hold the UNet and text encoders apart: {'unet': m, 'te1': m, 'te2': m}."""
        root = torch.nn.Module()
        for name, m in components.items():
            root.add_module(name, m)
        shapes = {f"{c}.{n}": logical_shape(p) for c, m in components.items() for n, p in m.named_parameters()}
        return cls(root, modelmap=ModelMap(shapes, {c: f"{c}." for c in components}), **kw)

    # --- public API ------------------------------------------------------------------------------
    def prepare(self, network: Network) -> LoadReport:
        """Bind a network to this model (cached); raises ModelMismatchError if nothing fits."""
        b = self._bindings.get(id(network))
        if b is None or b.network is not network:
            b = bind(network, self.modelmap)
            self._bindings[id(network)] = b
        return b.report

    def apply(self, items: Sequence[tuple], *, step: Optional[int] = None, total: Optional[int] = None,
              hires: Optional[bool] = None, mode: str = "merge", load_s: float = 0.0) -> ApplyStats:
        """Make the model equal base + these networks. items: (Network, request[, mode]).

        The same set again is a no-op; a changed set touches only weights whose effective value changed.
        Binding errors are raised before any weight is written; a failure while writing rolls back.
        """
        if step is not None:
            self.step = step
        if total is not None:
            self.total = total
        if hires is not None:
            self.hires = hires
        stats = ApplyStats(networks=len(items), load_s=load_s)
        t0 = time.perf_counter()
        self.verify()
        wanted: dict = {}
        for item in items:
            network, request = item[0], item[1]
            m = item[2] if len(item) > 2 else mode
            if m not in MODES:
                raise ValueError(f"mode must be one of {MODES}, not {m!r}")
            report = self.prepare(network)
            stats.reports.append(report)
            key = (id(network), request.dyn, m)
            wanted[key] = _Active(key, network, request, self._bindings[id(network)], m)
        stats.bind_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._set_active(wanted)
        stats.slots_written = self._sync()
        stats.write_s = time.perf_counter() - t1
        self._skipped = [(self._active[k[0]].network.name, s.target.weight, why) for s in self._slots.values()
                         for k, route, why in s.routes or () if route == "skip"]
        stats.skipped = list(self._skipped)
        stats.lowbit_bypass = sum(1 for k, h in self._hooks.items() if h.items and h.slot.lowbit is not None)
        stats.lowbit_stochastic = sum(1 for s in self._slots.values() if s.applied and s.lowbit is not None)
        log.info("%s", stats.line())
        return stats

    def set_step(self, step: int, total: int, hires: bool = False) -> int:
        """Move every scheduled multiplier to `step` (1-based) of `total`; returns weights written."""
        self.step, self.total, self.hires = step, total, hires
        return self._sync()

    def restore(self) -> None:
        """Every touched weight back to its original bits; hooks removed; networks dropped (where backups are
        kept, their compiled factors are too, until an apply with another set: the same set again costs no
        conversion)."""
        hold = self.keeps_memory()
        with torch.no_grad():
            for slot in self._slots.values():
                self._put_back(slot)
        self._seal_kept()
        if not hold:
            self._compiled.clear()        # nothing is held between generations then
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self._slots.clear()
        self._active.clear()

    def park(self) -> None:
        """End of a generation, weights left as they are (the hosts' "same set again is free"): the next
        `apply` first checks, in one batch, that every weight still holds what was written (sample bits and
        shape), and forgets (without writing) any that someone else changed since, e.g. a checkpoint
        reloaded into the same tensors; its networks are then applied to the new weights. The kept backups
        are checked again too. `restore` after `park` is exact as ever."""
        slots = [s for s in self._slots.values() if s.backup is not None]
        for slot, bits in zip(slots, sample_bits([s.view() for s in slots])):
            slot.sealed = (slot.param.data_ptr(), _version(slot.param), bits)
        for k in self._kept.values():
            k.verified = False

    def keeps_memory(self) -> bool:
        """Whether backups stay held between generations (keep_backups; by default where they are in host
        memory): a host parks (`park`) instead of restoring only then, so parking holds no more memory."""
        if self.keep_backups is not None:
            return self.keep_backups
        return all(s.backup.device.type == "cpu" for s in self._slots.values() if s.backup is not None)

    def forget(self) -> None:
        """Drop every state without writing a weight (the host replaced the weights: a checkpoint loaded into
        this model); hooks removed, backups and compiled factors freed."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self._slots.clear()
        self._active.clear()
        self.release_backups()

    @property
    def active_networks(self) -> list:
        return [a.network for a in self._active.values()]

    def extra_memory(self) -> int:
        """Bytes held beyond the model: backups of weights and biases, in use or kept; scratch buffers."""
        held = [t for s in self._slots.values() for t in (s.backup, s.bias_backup) if t is not None]
        held += [k.backup for k in self._kept.values()] + list(self._work.values())
        return sum(t.numel() * t.element_size() for t in held) + sum(c.nbytes() for c in self._compiled.values())

    def release_backups(self) -> int:
        """Free the backups kept after `restore` (see keep_backups), the scratch buffers and the compiled
        factors of networks no longer active; returns the bytes released."""
        n = sum(k.backup.numel() * k.backup.element_size() for k in self._kept.values())
        n += sum(t.numel() * t.element_size() for t in self._work.values())
        idle = [k for k in self._compiled if k not in self._active]
        n += sum(self._compiled[k].nbytes() for k in idle)
        for k in idle:
            del self._compiled[k]
        self._kept.clear()
        self._work.clear()
        return n

    def _scratch(self, n: int, device: torch.device, which: int = 0) -> Tensor:
        """Flat float32 buffer `which` (0, 1: LoHa's two products; 2: the float32 sum for an fp16/bf16
        weight) of ≥ n elements on `device`, reused across weights and applies (each is the largest
        touched weight in float32, made when first needed: 0.04 GB for SD1.5, 0.26 GB for Flux)."""
        buf = self._work.get((device, which))
        if buf is None or buf.numel() < n:
            self._work[(device, which)] = None      # the old one freed before the new one is made
            buf = self._work[(device, which)] = torch.empty(n, dtype=torch.float32, device=device)
        return buf

    # --- internals ----------------------------------------------------------------------------------
    def _set_active(self, wanted: dict) -> None:
        for key in list(self._active):
            if key not in wanted:
                for slot in self._slots.values():
                    slot.forget(key)
                del self._active[key]
        for key in [k for k in self._compiled if k not in wanted]:
            del self._compiled[key]
        for key, act in wanted.items():
            old = self._active.get(key)
            self._active[key] = act
            if old is not None and old.network is act.network:
                continue
            for slot in self._slots.values():
                slot.forget(key)
            comp = self._compiled.get(key)
            if comp is None or comp.network is not act.network:
                comp = self._compiled[key] = _Compiled(act.network, [
                    (target, mod.body, mod.contribution(act.request.dyn, target.placement()))
                    for target, mod in act.binding.pairs])
            for target, body, contribution in comp.contribs:
                slot = self._slot(target)
                slot.contribs[(key, body)] = contribution
                slot.routes = slot.ms = None

    def _slot(self, target: Target) -> _Slot:
        """The slot of the whole weight `target` names (one per parameter, whatever rows a network covers)."""
        k = target.weight
        slot = self._slots.get(k)
        if slot is None:
            param = self._live(target.weight, target.module)
            bias = self._live(target.bias, target.module) if target.bias else None
            static = self._static.get(k)
            if static is None:
                whole = replace(target, rows=None, swap=False, shape=logical_shape(param)) \
                    if target.rows is not None or target.swap else target
                static = self._static[k] = (whole, (target.component, block_of(target, self.modelmap)))
            slot = _Slot(target=static[0], param=param, bias_param=bias, group=static[1],
                         lowbit=lowbit_of(param, self.dequantize), live=True)
            self._slots[k] = slot
        return slot

    def _multipliers(self) -> Callable:
        """m(active key, (component, block)): a network's multiplier there at the current step, each asked once."""
        cache: dict = {}

        def m(key: tuple, group: tuple) -> float:
            k = (key, group)
            v = cache.get(k)
            if v is None:
                v = cache[k] = float(self._active[key].request.weight(group[0], group[1], self.step, self.total,
                                                                      self.hires))
            return v
        return m

    def _sync(self) -> int:
        """Bring every slot to the state the active networks want now; returns slots written. Per slot only a
        tuple compare where nothing moved: multipliers are computed once per (group, networks) signature."""
        mult = self._multipliers()
        by_sig: dict = {}
        plan, moved = [], []
        for slot in self._slots.values():
            if slot.routes is None:   # once per set, before any multiplier: apply reports skips at any step
                self._route_slot(slot)
            ms = by_sig.get(slot.sig)
            if ms is None:
                ms = by_sig[slot.sig] = tuple(mult(k, slot.group) for k in slot.sig[1])
            if ms == slot.ms:
                continue
            n = len(slot.merge_keys)
            want = tuple((k, m) for k, m in zip(slot.merge_keys, ms[:n]) if m != 0.0)
            if slot.bypass_keys or slot.target.module in self._hooks:
                self._set_bypass(slot, tuple((k, m) for k, m in zip(slot.bypass_keys, ms[n:]) if m != 0.0))
            moved.append((slot, ms))
            if want != slot.applied:
                plan.append((slot, want))
        done = []
        with torch.no_grad():
            try:
                for slot, want in plan:
                    self._write(slot, want)
                    done.append((slot, slot.applied))
                    slot.applied = want
            except BaseException:
                log.error("patching failed after %d of %d weights; rolling back", len(done), len(plan))
                failed = plan[len(done)][0]
                if failed.backup is not None:
                    self._write(failed, failed.applied)    # it may be half-written (in place: applied == ())
                for slot, previous in reversed(done):
                    self._write(slot, previous)
                    slot.applied = previous
                raise
            for slot, ms in moved:
                slot.ms = ms
            for slot, _ in plan:
                if slot.retired:       # written without them: nothing to roll back to any more
                    slot.retired.clear()
            self._drop_idle_slots()
        return len(plan)

    def _live(self, name: str, module: str) -> Optional[Tensor]:
        """The parameter now at `name` (None: no such parameter). Hosts may replace parameter objects: Forge's
        GGUF Linear sets a new ParameterGGUF on every `.to()` (its `_apply`), which it runs before each
        sampling, so the objects seen when this Patcher was built go stale; the module's attribute is the truth."""
        leaf = name.rsplit(".", 1)[-1]
        current = getattr(self._modules.get(module), leaf, None)
        if isinstance(current, torch.Tensor):
            self._params[name] = current
            return current
        return self._params.get(name)

    def _route_slot(self, slot: _Slot) -> None:
        """The slot's routes, merge/bypass entries and multiplier signature, for its contributions now."""
        if slot.backup is None and not slot.live:   # never written: a parameter the host replaced is followed
            live = self._live(slot.target.weight, slot.target.module)
            slot.param = slot.param if live is None else live
            if slot.target.bias:
                slot.bias_param = self._live(slot.target.bias, slot.target.module)
        slot.live = False
        slot.lane = None
        slot.routes = [(k, *self._route(slot, self._active[k[0]].mode, c)) for k, c in slot.contribs.items()]
        slot.merge_keys = tuple(k for k, route, _ in slot.routes if route == "merge")
        slot.bypass_keys = tuple(k for k, route, _ in slot.routes if route == "bypass")
        slot.sig = (slot.group, tuple(k[0] for k in slot.merge_keys + slot.bypass_keys))
        slot.ms = None

    def verify(self, reloaded: bool = False) -> int:
        """After `restore` or `park` (every apply starts with it; a host may call it after loading weights into
        this model): in one batch, check the kept backups not checked since (dropped where the weight changed:
        backed up anew when next written) and the parked weights: one written in place by someone else
        (same storage, new version) or whose sample bits or shape differ is forgotten without a write, its
        current value the new original, and its networks are applied to it at the next apply. A parked
        tensor the host moved (new storage, same bits) stays ours. Returns the parked weights forgotten.
        reloaded: the caller knows the host loaded new weights into this model (no warning, it says so)."""
        kept = [(n, k) for n, k in self._kept.items() if not k.verified]
        parked = [s for s in self._slots.values() if s.sealed is not None]
        if not kept and not parked:
            return 0
        params = [self._params[n] for n, _ in kept]
        same = [k.sample is not None and k.same_tensor(p) for (_, k), p in zip(kept, params)]
        held = iter(equal_bits([(bits, k.sample) for ((_, k), bits, s)
                                in zip(kept, sample_bits([p.data for p in params]), same) if s]))
        for (name, k), s in zip(kept, same):
            if s and next(held):           # `_Kept.holds`, its bit comparisons batched
                k.verified = True
            else:
                del self._kept[name]
                log.debug("%s changed since the last restore: its kept backup is dropped", name)
        changed = []
        views = [s.view() for s in parked]
        unchanged = equal_bits([(bits, s.sealed[2]) for s, bits in zip(parked, sample_bits(views))])
        for slot, w, same_bits in zip(parked, views, unchanged):
            ptr, version, _ = slot.sealed
            rewritten = slot.param.data_ptr() == ptr and _version(slot.param) != version
            if rewritten or w.shape != slot.backup.shape or w.dtype != slot.backup.dtype or not same_bits:
                changed.append(slot)
            slot.sealed = None
        if changed and not reloaded:
            log.warning("%d weight(s) changed outside lycoris-loader since the last generation (e.g. %s): "
                        "the networks are applied to them as they are now", len(changed), changed[0].target.weight)
        for slot in changed:
            del self._slots[slot.target.weight]
            self._kept.pop(slot.target.weight, None)
            h = self._hooks.pop(slot.target.module, None)
            if h is not None:
                h.remove()
            for key in {k[0] for k in slot.contribs}:   # re-added (to every weight) by the coming _set_active
                self._active.pop(key, None)
        return len(changed)

    def _route(self, slot: _Slot, mode: str, c) -> tuple:
        """('merge' | 'bypass' | 'skip', reason where skipped) for one contribution on a slot."""
        lb = slot.lowbit
        if lb is None:
            return ("bypass" if mode == "bypass" and self._can_bypass(slot) else "merge"), None
        if lb.kind == "fp8" and self.lowbit == "stochastic" and mode == "merge":
            return "merge", None
        if not self._can_bypass(slot):
            module = type(self._modules.get(slot.target.module)).__name__
            return "skip", f"{lb.label} weight in a {module}, which a forward hook cannot reach"
        if needs_weight(c) and not lb.dequantizable:
            what = f"{c.adapter.algo} with DoRA" if c.dora_scale is not None else c.adapter.algo
            return "skip", (f"{what} needs the weight for its ΔW and a {lb.label} weight has no dequantize() "
                            f"(the host can pass Patcher(dequantize=...))")
        return "bypass", None

    def _can_bypass(self, slot: _Slot) -> bool:
        """Forward hooks cover Linear and Conv2d (a contribution on some rows adds zero to the others), and a
        host's own quantised Linear (Forge's bitsandbytes and GGUF layers subclass nn.Module only) where the
        weight is low-bit and 2-D; other weights (norms, OpenCLIP's fused in_proj) are merged. Not
        MultiheadAttention's out_proj: MHA reads its weight directly and never calls its forward."""
        module = self._modules.get(slot.target.module)
        if module is None or getattr(module, "weight", None) is not slot.param or \
                isinstance(module, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
            return False
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            return True
        return slot.lowbit is not None and len(slot.target.shape) == 2 and \
            not type(module).__module__.startswith("torch.")

    def _copy_out(self, t: Tensor) -> Tensor:
        """A backup copy of `t`: pinned host memory with backup='cpu' on an accelerator, else beside it."""
        if self.backup_where == "cpu" and t.device.type != "cpu":
            return t.detach().to("cpu", copy=True).pin_memory()
        return t.detach().clone()

    def _ensure_backup(self, slot: _Slot) -> None:
        """Back up the weight on first write (a kept backup if still valid); the bias only once a network on
        the slot carries a bias delta."""
        if slot.backup is None:
            kept = self._kept.pop(slot.target.weight, None)
            if kept is not None and not kept.verified:     # not yet checked this generation (set_step before apply)
                kept = kept if kept.holds(slot.param, sample_bits([slot.view()])[0]) else None
            slot.backup = kept.backup if kept is not None and kept.same_tensor(slot.param) else \
                self._copy_out(slot.view())
        if slot.bias_backup is None and slot.bias_param is not None and \
                any(c.bias_delta is not None for c in slot.contribs.values()):
            slot.bias_backup = self._copy_out(slot.bias_view())

    def _put_back(self, slot: _Slot) -> None:
        """The original weight and bias back in the parameters; the weight backup kept (keep_backups) or freed."""
        if slot.backup is None:
            return
        if slot.applied:
            slot.view().copy_(slot.backup)
            slot.applied = ()
        if slot.bias_backup is not None:
            slot.bias_view().copy_(slot.bias_backup)
        keep = self.keep_backups
        if keep is None:
            keep = slot.backup.device.type == "cpu"
        if keep:
            self._kept[slot.target.weight] = _Kept.of(slot)     # its sample: `_seal_kept`, in one batch
        slot.backup = slot.bias_backup = None
        slot.sealed = None

    def _seal_kept(self) -> None:
        """Sample bits of the weights whose backups were kept since the last call (the weight holds the
        backup's bits then), in one batch; every kept backup is checked again at the next apply."""
        self._sample_new_kept()
        for k in self._kept.values():
            k.verified = False

    def _sample_new_kept(self) -> None:
        new = [(n, k) for n, k in self._kept.items() if k.sample is None]
        for (n, k), bits in zip(new, sample_bits([self._params[n].data for n, _ in new])):
            k.sample = bits

    def _factors(self, slot: _Slot, key: tuple, device: torch.device, dtype: torch.dtype) -> Optional[tuple]:
        """(up, down) of a plain-LoRA contribution on `device` in `dtype`, converted once per set and cached
        (`_Compiled`: kept across restore while the same set comes back)."""
        comp = self._compiled.get(key[0])
        # a retired network's (a rollback) are converted without being cached
        cache = comp.factors if comp is not None and key in slot.contribs else {}
        k = (slot.target.weight, key[1], device, dtype)
        f = cache.get(k, False)
        if f is False:
            low = slot.contribution(key).low_rank(device)
            f = cache[k] = None if low is None else (low[0].to(dtype).contiguous(), low[1].to(dtype).contiguous())
        return f

    def _write(self, slot: _Slot, items: tuple) -> None:
        """Weight (and bias) := pure function of backup and items (see module doc and `write_weight`)."""
        if not items and slot.backup is None:
            return                                 # never written: the original is in place
        if slot.lowbit is not None:
            self._write_stochastic(slot, items)    # `_route` merges no other low-bit weight
            return
        w = slot.view()
        if len(items) == 1:      # one network: its lane, made at its first write
            lane = slot.lane
            if lane is None or items[0][0] != lane[0] or slot.backup is not lane[2] or \
                    lane[1] != (w.dtype, w.shape, w.device) or not w.is_contiguous():
                self._ensure_backup(slot)
                lane = slot.lane = self._lane(slot, items[0][0], w)
            if lane is not None:
                # the bits of write_weight's plain-LoRA branch, without building its terms; the weight
                # itself is not kept: a tensor the host moved is written where it is now
                write_lora(w if w.dim() == 2 else w.view(lane[3].shape), lane[3], lane[4], lane[5],
                           items[0][1] * lane[6], holds_base=not slot.applied)
                return
        else:
            self._ensure_backup(slot)
        dev = w.device
        base = slot.backup if slot.backup.device == dev else slot.backup.to(dev, non_blocking=True)
        lr_dtype = w.dtype if self.compute == "weight" else torch.float32
        terms = [(slot.contribution(k), m, self._factors(slot, k, dev, lr_dtype)) for k, m in items]
        # applied == (): the weight holds the backup's bits, so a LoRA GEMM can run in place
        write_weight(w, base, terms, self.compute, holds_base=not slot.applied, scratch=self._scratch)
        if slot.bias_backup is not None:
            contribs = [(c, m) for c, m, _ in terms]
            bias = slot.bias_backup.to(dev, non_blocking=True)
            if any(c.bias_delta is not None for c, _ in contribs):
                bias = merged_bias(bias, contribs)
            slot.bias_view().copy_(bias)

    def _lane(self, slot: _Slot, key: tuple, w: Tensor) -> Optional[tuple]:
        """The slot's lane (see `_Slot.lane`) for `key` alone, or None where write_weight's plain-LoRA
        branch does not apply: another type, a bias delta, a weight summed in float32 (fp16/bf16 with
        compute='float32'), a backup elsewhere (backup='cpu') or not contiguous."""
        base = slot.backup
        if slot.bias_backup is not None or not lora_in_place(w, self.compute) or base.device != w.device or \
                not base.is_contiguous():
            return None
        f = self._factors(slot, key, w.device, w.dtype if self.compute == "weight" else torch.float32)
        if f is None:
            return None
        return key, (w.dtype, w.shape, w.device), base, base.view(w.shape[0], -1), f[0], f[1], \
            slot.contribution(key).scale

    def _write_stochastic(self, slot: _Slot, items: tuple) -> None:
        """An fp8 weight := stochastic_round(float32(backup) + Σ ΔW), seeded per weight (module doc); the
        bias, if a network changes it and it is fp8 too, likewise. No items: the backup's bits."""
        self._ensure_backup(slot)
        w = slot.view()
        dev = w.device
        with torch.no_grad():
            terms = [(slot.contribution(k), m, self._factors(slot, k, dev, torch.float32)) for k, m in items]
            if not terms:
                w.copy_(slot.backup.to(dev))
            else:
                base32 = slot.backup.to(dev).float()
                acc = torch.empty(w.shape, dtype=torch.float32, device=dev)
                write_weight(acc, base32, terms, "float32", holds_base=False, scratch=self._scratch)
                w.copy_(stochastic_round(acc, w.dtype, weight_seed(slot.target.weight, self.lowbit_seed)))
            if slot.bias_backup is not None:
                bias = merged_bias(slot.bias_backup.to(dev), [(c, m) for c, m, _ in terms])
                b = slot.bias_view()
                if b.dtype in FP8_DTYPES:
                    bias = stochastic_round(bias, b.dtype, weight_seed(slot.target.bias or "", self.lowbit_seed))
                b.copy_(bias)

    def _weight32(self, slot: _Slot, device: torch.device) -> Optional[Tensor]:
        """The float32 original weight for a bypass ΔW; a low-bit one dequantised from the module's weight now
        (Forge swaps in a new parameter object when it moves a quantised layer); None: not to be had."""
        if slot.lowbit is None:
            src = slot.backup if slot.backup is not None else slot.view()
            return src.to(device).float()
        current = getattr(self._modules.get(slot.target.module), "weight", None)
        return dequantized(current if isinstance(current, torch.Tensor) else slot.param, device, self.dequantize)

    def _drop_idle_slots(self) -> None:
        idle = [k for k, s in self._slots.items() if not s.contribs and not s.applied]
        for k in idle:
            slot = self._slots.pop(k)
            self._put_back(slot)
            h = self._hooks.pop(slot.target.module, None)
            if h is not None:
                h.remove()
        if idle:
            self._sample_new_kept()     # restored by us just now: verified for this generation

    # --- bypass ---------------------------------------------------------------------------------
    def _set_bypass(self, slot: _Slot, items: tuple) -> None:
        name = slot.target.module
        hook = self._hooks.get(name)
        if not items:
            if hook is not None:
                hook.items = ()
            return
        if hook is None:
            hook = _BypassHook(self._modules[name], slot, self._weight32, lambda msg: self.runtime_warnings.append(msg))
            self._hooks[name] = hook
        new = tuple((slot.contribs[k], m) for k, m in items)
        if {id(c) for c, _ in new} != {id(c) for c, _ in hook.items}:
            hook.clear_caches()
        hook.items = new


def write_weight(w: Tensor, base: Tensor, terms: list, compute: str = "float32", holds_base: bool = False,
                 scratch: Optional[Callable[..., Tensor]] = None) -> None:
    """w := base + Σ (W'_i(m_i) − base), written in place; base is the original weight (not w itself);
    holds_base: w already equals base bit for bit (plain LoRA terms then update w in place, w += α·up@down,
    without reading base); scratch(n, device, which): reusable flat float32 buffers of ≥ n elements
    (which = 0, 1: LoHa's products; 2: the float32 sum for an fp16/bf16 weight); on CPU, fresh memory for
    each weight costs page faults: more than the arithmetic.

    terms: (Contribution, m, LoRA factors (up, down) or None); the factors are float32, or w's dtype with
    compute='weight'. Plain LoRA terms: one GEMM over the concatenated factors into w (fp32 weights, or any
    dtype with compute='weight'): `write_lora`, w.copy_(base) then w.addmm_(up, down, α) (the same bits
    as addmm(base, up, down, α, out=w), which copies base into w first); other terms accumulate in float32
    in place (LoHa as addcmul of its two products), then one rounding to w's dtype. The same function
    serves the Patcher and `merge`, so both give the same bits.
    """
    if not terms:
        w.copy_(base)
        return
    direct = lora_in_place(w, compute)
    lr = [(f, c, m) for c, m, f in terms if f is not None]
    other = [(c, m) for c, m, f in terms if f is None]
    if lr and not other and direct:
        up, down, alpha = stack_factors(lr)
        w2 = w.view(w.shape[0], -1)
        write_lora(w2, base.reshape(w2.shape), up, down, alpha, holds_base)
        return
    n = w.numel()
    if w.dtype == torch.float32 and w.is_contiguous():
        acc = w
    elif scratch is not None:
        acc = scratch(n, w.device, 2)[:n].view(w.shape)
    else:
        acc = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    started = holds_base and acc is w          # acc already holds base's bits: update it in place
    base32 = base if base.dtype == torch.float32 else None      # made only where a term reads it
    if lr:
        up, down, alpha = stack_factors([((u.float(), d.float()), c, m) for (u, d), c, m in lr])
        if not started:
            acc.copy_(base)                    # exact in float32
        acc.view(acc.shape[0], -1).addmm_(up, down, alpha=alpha)
        started = True
    for c, m in other:
        if base32 is None:
            base32 = base.float()
        pair = None
        if c.linear_in_strength:
            pair = c.hadamard(base32, (scratch(n, w.device, 0), scratch(n, w.device, 1))
                              if scratch is not None else None)
        if pair is not None:                   # LoHa: the product fused into the add, ΔW never materialised
            if started:
                acc.addcmul_(pair[0], pair[1], value=m * c.scale)
            else:
                torch.addcmul(base32, pair[0], pair[1], value=m * c.scale, out=acc)
                started = True
            continue
        if c.linear_in_strength:
            d, alpha = c.delta(base32), m * c.scale
        else:
            d, alpha = c.weight_delta(base32, m), 1.0
        if d is None:
            continue
        if started:
            acc.add_(d.reshape(acc.shape), alpha=alpha)
        else:
            torch.add(base32, d.reshape(acc.shape), alpha=alpha, out=acc)
            started = True
    if not started:
        acc.copy_(base)
    if acc is not w:
        w.copy_(acc)


def lora_in_place(w: Tensor, compute: str) -> bool:
    """Plain-LoRA terms are written straight into w by `write_lora` (a float32 weight, or any dtype with
    compute='weight', stored contiguously); else they are summed in float32 and rounded once."""
    return w.is_contiguous() and (w.dtype == torch.float32 or compute == "weight")


def write_lora(w2: Tensor, base2: Tensor, up: Tensor, down: Tensor, alpha: float, holds_base: bool) -> None:
    """w2 (out, in) := base2 + alpha·up@down, in place (the plain-LoRA write; holds_base: w2 already holds
    base2's bits, so only the GEMM runs)."""
    if not holds_base:
        w2.copy_(base2)
    w2.addmm_(up, down, alpha=alpha)


def stack_factors(terms: list) -> tuple:
    """terms [((up_i (out, r_i), down_i (r_i, in)), Contribution, m_i)] -> (up (out, R), down (R, in), alpha)
    with alpha·up@down = Σ m_i·s_i·up_i@down_i: one network keeps its factors and passes m·s as the GEMM's
    alpha; several are concatenated along the rank (R = Σ r_i) with their m·s folded into `up`."""
    if len(terms) == 1:
        (up, down), c, m = terms[0]
        return up, down, m * c.scale
    ups = [u * (m * c.scale) for (u, _), c, m in terms]
    return torch.cat(ups, dim=1), torch.cat([d for (_, d), _, _ in terms], dim=0), 1.0


def block_of(target: Target, modelmap: ModelMap) -> Optional[str]:
    """LBW block id of a target; None outside the blocks or where the architecture is unknown."""
    arch = modelmap.arch
    if arch not in ARCHS:
        return None if target.component == "unet" else "BASE"
    try:
        return block_id(target.component, target.ldm_path, arch, depth=(modelmap.depth, modelmap.singles))
    except BlockMapError:
        log.debug("no block for %s; block weights do not apply to it", target.weight)
        return None


def needs_weight(c: Contribution) -> bool:
    """Whether a contribution's W'(m) − W reads the original weight (DoRA, rotations, IA3, GLoRA)."""
    return (not c.adapter.additive) or c.adapter.needs_base or c.dora_scale is not None


class _BypassHook:
    """Forward hook: y + Σ m·s·h(x) in the input's dtype, added in the output's; LoRA as down/up ops, other
    types through their ΔW (cached: once per network where W' − W is linear in m, else once per m).

    weight32(slot, device): the float32 original weight (dequantised for low-bit weights) or None;
    report(text): where a failure met inside a forward goes (the network is then dropped on this module).
    """

    def __init__(self, module: torch.nn.Module, slot: _Slot,
                 weight32: Callable[[_Slot, torch.device], Optional[Tensor]], report: Callable[[str], None]) -> None:
        self.module = module
        self.slot = slot
        self.weight32 = weight32
        self.report = report
        self.items: tuple = ()
        self._delta_cache: dict = {}
        self._lr_cache: dict = {}
        self._failed: set = set()     # id(contribution) whose ΔW could not be made here
        self.handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    def clear_caches(self) -> None:
        self._lr_cache.clear()
        self._delta_cache.clear()
        self._failed.clear()

    def _factors(self, c, x: Tensor) -> Optional[tuple]:
        """LoRA (up, down) shaped for the module's op, in the input's dtype and device; cached."""
        k = (id(c), x.dtype, x.device)
        if k not in self._lr_cache:
            low = c.low_rank(x.device)
            if low is not None:
                up, down = low
                if isinstance(self.module, torch.nn.Conv2d):
                    # (r, in·kh·kw) -> (r, in, kh, kw); (out, r) -> (out, r, 1, 1): the weight's logical shape
                    down = down.reshape(down.shape[0], *self.slot.target.shape[1:])
                    up = up.reshape(up.shape[0], up.shape[1], 1, 1)
                low = (up.to(x.dtype), down.to(x.dtype))
            self._lr_cache[k] = low
        return self._lr_cache[k]

    def _delta(self, c, m: float, x: Tensor) -> Optional[tuple]:
        """(ΔW in x's dtype, factor to scale the op's output by); ΔW(m) for types not linear in m."""
        linear = c.linear_in_strength
        key = (None if linear else m, x.dtype, x.device)
        cached = self._delta_cache.get(id(c))
        if cached is None or cached[0] != key:
            base = self.weight32(self.slot, x.device) if needs_weight(c) else None
            if base is None:
                if needs_weight(c):
                    raise NotImplementedError(f"no float copy of the {self.slot.lowbit.label} weight")
                base = torch.zeros(self.slot.target.shape, dtype=torch.float32, device=x.device)
            d = c.weight_delta(base, 1.0 if linear else m)
            cached = (key, None if d is None else d.to(x.dtype))
            self._delta_cache[id(c)] = cached
        return None if cached[1] is None else (cached[1], m if linear else 1.0)

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        """The module's own op with another weight (hooks exist on Linear and Conv2d only: `_can_bypass`)."""
        mod = self.module
        if isinstance(mod, torch.nn.Conv2d):
            return F.conv2d(x, weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        return F.linear(x, weight)

    def _hook(self, module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.items:
            return output
        x = args[0]
        extra = None
        for c, m in self.items:
            if id(c) in self._failed:
                continue
            low = self._factors(c, x)
            if low is not None:
                up, down = low
                up = up * (m * c.scale)          # (out, r[, 1, 1]): the strength folded into the small factor
                if isinstance(module, torch.nn.Conv2d):
                    d = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
                    y = F.conv2d(d, up)
                else:
                    y = F.linear(F.linear(x, down), up)
            else:
                try:
                    got = self._delta(c, m, x)
                except DEQUANTIZE_ERRORS as e:   # a host's dequantiser inside a forward: report, never raise
                    if self.slot.lowbit is None:
                        raise
                    self._failed.add(id(c))
                    msg = f"{self.slot.target.weight}: {c.adapter.algo} dropped in bypass: {e}"
                    log.warning("%s", msg)
                    self.report(msg)
                    continue
                if got is None:
                    continue
                y = self._op(x, got[0])
                if got[1] != 1.0:
                    y = y * got[1]
            if self.slot.bias_param is not None:
                b = c.bias_change(self.slot.bias_param.data, m)
                if b is not None:
                    y = y + (b.reshape(1, -1, 1, 1) if y.dim() == 4 else b).to(y.dtype)
            extra = y if extra is None else extra + y
        if extra is None:
            return output
        return output + extra.to(output.dtype)
