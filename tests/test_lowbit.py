"""Networks on low-bit weights (#12): fp8 weights in bypass (exact) and with stochastic rounding, mixed
models, and packed 4/8-bit tensor subclasses, all on CPU.

The hosts' low-bit layers are imitated here, faithfully where it matters to the Patcher:
* fp8: A1111's "FP8 weight" keeps Linear/Conv2d weights (and biases) in float8_e4m3fn and casts them to the
  compute dtype in the forward (its manual cast; Forge's `ForgeOperations` likewise). torch has no fp8
  matmul on CPU, so `CastLinear` / `CastConv2d` do that cast: `F.linear(x, w.to(x.dtype), ...)`.
* GGUF: `GGUFLikeTensor` is a stand-in for Forge's `ParameterGGUF` / ComfyUI-GGUF's `GGMLTensor`: a
  torch.Tensor subclass holding Q8_0 blocks as uint8 (per 32 values an fp16 scale and 32 int8, 34 bytes:
  ggml's block_q8_0) whose `shape` is the real one, used by an nn.Linear subclass that dequantises in its
  forward (ComfyUI-GGUF's GGMLOps.Linear).
* NF4: `NF4LikeParam` is a stand-in for bitsandbytes' `Params4bit`: an nn.Parameter subclass holding two
  4-bit NF4 codes per byte in a (n/2, 1) uint8 tensor, with the real shape and per-64 absmax in
  `quant_state`, used by a plain nn.Module Linear (Forge's bitsandbytes layers subclass nn.Module only).
Stand-ins, because the real classes cannot run here: bitsandbytes' 4-bit kernels need CUDA and the `gguf`
package (which Forge's class imports) is not installed. The real Params4bit has no `dequantize()`
method: a host passes its own dequantiser (`Patcher(dequantize=...)`), covered by `OpaqueQ8Tensor`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fixtures.models import tiny_model, unet_inputs
from lib_lycoris.network import load_network
from lib_lycoris.patcher import (Patcher, Strength, lowbit_of, logical_shape, stochastic_round, weight_seed,
                                 write_weight)
from lib_lycoris.tags import parse_tag
from synth import make_network

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# merge and bypass in float32 reach the same output through different sums (as in test_patcher)
TOL = dict(rtol=1e-4, atol=1e-4)


# --- the hosts' low-bit layers (stand-ins: see the module docstring) -----------------------------------

Q8_BLOCK = 32      # ggml block_q8_0: QK8_0 = 32 values, one fp16 scale
NF4_BLOCK = 64     # bitsandbytes' default 4-bit blocksize
# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes `get_4bit_type('nf4')`).
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def q8_pack(w: torch.Tensor) -> torch.Tensor:
    """(n/32, 34) uint8 blocks: fp16 scale d = max|x|/127 (2 bytes), then round(x/d) as int8."""
    blocks = w.detach().float().reshape(-1, Q8_BLOCK)                        # (n/32, 32)
    d = (blocks.abs().amax(1, keepdim=True) / 127).half()                    # (n/32, 1)
    q = torch.round(blocks / d.float().clamp_min(1e-12)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=1)     # (n/32, 2 + 32)


def q8_unpack(raw: torch.Tensor, shape: tuple) -> torch.Tensor:
    raw = raw.as_subclass(torch.Tensor)
    d = raw[:, :2].contiguous().view(torch.float16).float()                  # (n/32, 1)
    q = raw[:, 2:].contiguous().view(torch.int8).float()                     # (n/32, 32)
    return (q * d).reshape(shape)


class GGUFLikeTensor(torch.Tensor):
    """Q8_0 blocks in uint8 with the real shape in `tensor_shape` (as ComfyUI-GGUF's GGMLTensor)."""

    @staticmethod
    def __new__(cls, packed: torch.Tensor):
        return torch.Tensor._make_subclass(cls, packed, False)

    def __init__(self, *args, **kwargs) -> None:
        pass

    @property
    def shape(self):
        s = getattr(self, "tensor_shape", None)      # results of torch ops on it carry no attributes
        return s if s is not None else self.size()

    def dequantize(self) -> torch.Tensor:
        return q8_unpack(self, self.tensor_shape)

    @classmethod
    def parameter(cls, w: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(cls(q8_pack(w)), requires_grad=False)   # a custom tensor stays its class
        p.tensor_shape = torch.Size(w.shape)
        return p


class OpaqueQ8Tensor(GGUFLikeTensor):
    """The same format without a dequantize() method: only the host's own function reads it."""

    dequantize = torch.Tensor.dequantize


@dataclass
class QuantState:
    shape: torch.Size
    absmax: torch.Tensor
    blocksize: int = NF4_BLOCK


class NF4LikeParam(nn.Parameter):
    """Two NF4 codes per byte, (n/2, 1) uint8, real shape and absmax in `quant_state` (as Params4bit)."""

    def __new__(cls, packed: torch.Tensor, quant_state: QuantState):
        p = torch.Tensor._make_subclass(cls, packed, False)
        p.quant_state = quant_state
        return p

    def __init__(self, *args, **kwargs) -> None:
        pass

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "NF4LikeParam":
        blocks = w.detach().float().reshape(-1, NF4_BLOCK)                    # (n/64, 64)
        absmax = blocks.abs().amax(1)
        idx = (blocks / absmax[:, None]).reshape(-1, 1).sub(NF4_CODE).abs().argmin(1).to(torch.uint8)
        packed = (idx[0::2] << 4 | idx[1::2]).reshape(-1, 1)                # (n/2, 1)
        return cls(packed, QuantState(torch.Size(w.shape), absmax))

    def dequantize(self) -> torch.Tensor:
        raw = self.data.reshape(-1)
        idx = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()  # (n,)
        vals = NF4_CODE[idx].reshape(-1, self.quant_state.blocksize) * self.quant_state.absmax[:, None]
        return vals.reshape(self.quant_state.shape)


def host_dequantize(w: torch.Tensor) -> torch.Tensor:
    """The host's own dequantiser (Forge's `dequantize_tensor`, bitsandbytes' `dequantize_4bit`)."""
    if isinstance(w, GGUFLikeTensor):
        return q8_unpack(w, w.tensor_shape)
    if isinstance(w, NF4LikeParam):
        return NF4LikeParam.dequantize(w)
    return w


class CastLinear(nn.Linear):
    """A1111's fp8 / ComfyUI-GGUF Linear: the stored weight cast (dequantised) to the input's dtype per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, host_dequantize(self.weight).to(x.dtype), b)


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), b)


class Forge4bitLinear(nn.Module):
    """Forge's bitsandbytes Linear subclasses nn.Module only (backend/operations_bnb.py ForgeLoader4Bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, host_dequantize(self.weight).to(x.dtype), self.bias)


# --- helpers ----------------------------------------------------------------------------------------

def _leaves(unet: nn.Module):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def make_lowbit(tm, dtype=E4M3, pick=lambda name, m: True) -> list:
    """Every picked Linear/Conv2d of the UNet stored in `dtype`, weight and bias, with a casting forward
    (in place: the LDM view shares these very modules). Returns the names changed."""
    names = []
    for name, m in _leaves(tm.unet):
        if pick(name, m):
            m.__class__ = CastConv2d if isinstance(m, nn.Conv2d) else CastLinear
            m.to(dtype)
            names.append(name)
    return names


def twin_of(tm, seed: int = 0):
    """A float32 twin of `tm` whose weights are the stored ones dequantised (fp8: `w.float()`)."""
    twin = tiny_model(tm.arch, seed)
    mods = dict(tm.unet.named_modules())
    with torch.no_grad():
        for name, m in twin.unet.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                src = getattr(mods[name], pname)
                p.copy_(host_dequantize(src).float().reshape(p.shape))
    return twin


def _bits(model: nn.Module) -> dict:
    out = {}
    for k, v in model.named_parameters():
        t = v.as_subclass(torch.Tensor) if type(v) not in (torch.Tensor, nn.Parameter) else v.detach()
        out[k] = t.view(torch.uint8).clone() if t.dtype.itemsize == 1 else t.clone()
    return out


def _same_bits(model: nn.Module, snap: dict) -> None:
    now = _bits(model)
    for k in snap:
        assert torch.equal(now[k], snap[k]), f"{k} changed"


def forward(tm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return tm.unet(**inputs).sample


def reference(items: list, tm, inputs) -> torch.Tensor:
    """The output of the dequantised float32 twin with the networks merged in float32 (`tm` as stored:
    call it before a Patcher merges anything into `tm`)."""
    twin = twin_of(tm)
    Patcher(twin.root).apply(items)
    return forward(twin, inputs)


def hooked_modules(p: Patcher) -> set:
    """ids of the modules whose hooks carry networks now."""
    return {id(h.module) for h in p._hooks.values() if h.items}


@pytest.fixture(scope="module")
def sd1():
    return tiny_model("sd1", 0)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, sd1):
    d = tmp_path_factory.mktemp("lowbit")
    kinds = ("lora", "loha", "lokr", "ia3", "glora", "lora-dora", "diag-oft", "full")
    return {k: load_network(make_network(d / f"{k}.safetensors", sd1.root, k, seed=10 + i, components=("unet",)))
            for i, k in enumerate(kinds)}


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs("sd1", batch=1)


# --- detection ------------------------------------------------------------------------------------

def test_lowbit_detection():
    w = torch.randn(64, 32)
    assert all(lowbit_of(w.to(d)) is None for d in (torch.float32, torch.float16, torch.bfloat16))
    assert lowbit_of(nn.Parameter(w)) is None
    for d in (E4M3, E5M2):
        lb = lowbit_of(nn.Parameter(w.to(d), requires_grad=False))
        assert lb.kind == "fp8" and lb.dequantizable and lb.label == str(d).replace("torch.", "")
    packed = lowbit_of(w.to(torch.int8))
    assert packed.kind == "packed" and not packed.dequantizable
    assert lowbit_of(w.to(torch.uint8), dequantize=host_dequantize).dequantizable
    g, o = GGUFLikeTensor.parameter(w), OpaqueQ8Tensor.parameter(w)
    n = NF4LikeParam.quantize(w)
    assert lowbit_of(g).kind == "subclass" and lowbit_of(g).dequantizable and "uint8" in lowbit_of(g).label
    assert not lowbit_of(o).dequantizable and lowbit_of(o, dequantize=host_dequantize).dequantizable
    assert lowbit_of(n).kind == "subclass" and lowbit_of(n).dequantizable
    assert tuple(n.shape) == (64 * 32 // 2, 1) and logical_shape(n) == (64, 32) == logical_shape(g)
    # the stand-ins are real quantisers: their dequantised weight is close to, not equal to, the original
    for p, tol in ((g, 0.01), (n, 0.1)):
        err = (p.dequantize() - w).norm() / w.norm()
        assert 0 < err < tol


# --- fp8 in bypass ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "loha", "ia3", "glora", "lora-dora", "diag-oft"])
def test_fp8_bypass_equals_the_fp32_reference(nets, inputs, kind):
    """A network on an all-fp8 UNet (A1111's FP8 weight) acts through forward hooks, in the mode the
    caller asked ('merge'): the output is the float32 twin's (same fp8-cast weights, network merged in
    float32); no fp8 weight written. DoRA, OFT, IA3 and GLoRA read the weight: from `w.float()`."""
    tm = tiny_model("sd1", 0)
    fp8 = make_lowbit(tm)
    snap = _bits(tm.unet)
    plain = forward(tm, inputs)
    p = Patcher(tm.root)
    stats = p.apply([(nets[kind], Strength(0.8))])
    _same_bits(tm.unet, snap)
    assert stats.slots_written == 0 and stats.lowbit_bypass > 0 and not stats.skipped
    modules = dict(tm.unet.named_modules())
    assert hooked_modules(p) <= {id(modules[n]) for n in fp8}
    got = forward(tm, inputs)
    ref = reference([(nets[kind], Strength(0.8))], tm, inputs)
    assert not torch.allclose(got, plain, **TOL), "non-vacuity: the network changes the output"
    torch.testing.assert_close(got, ref, **TOL)
    p.restore()


def test_fp8_e5m2_and_what_plain_rounding_loses(nets, inputs):
    """e5m2 (Forge's other fp8) in bypass matches its reference; writing cast(backup + ΔW) into the weights
    (the write path's round to nearest, what the Patcher did before) would miss it by far: the point of
    the bypass."""
    tm = tiny_model("sd1", 0)
    make_lowbit(tm, E5M2)
    items = [(nets["lora"], Strength(1.0))]
    p = Patcher(tm.root)
    p.apply(items)
    got = forward(tm, inputs)
    ref = reference(items, tm, inputs)
    torch.testing.assert_close(got, ref, **TOL)
    p.restore()
    plain = forward(tm, inputs)
    with torch.no_grad():
        for target, mod in p._bindings[id(nets["lora"])].pairs:
            param = p._params[target.weight]
            c = mod.contribution(None, target.placement())
            write_weight(param.data, param.data.clone(), [(c, 1.0, c.low_rank(param.device))])
    lost = (forward(tm, inputs) - ref).norm() / (ref - plain).norm()
    assert lost > 0.2, f"round-to-nearest misses the network's change by only {lost:.3f}: the test lost its point"


def test_stacked_networks_all_act_on_fp8(nets, inputs):
    """Several networks on fp8 weights all act (A1111 #15995: with FP8 weight only the last one did)."""
    tm = tiny_model("sd1", 0)
    make_lowbit(tm)
    p = Patcher(tm.root)
    three = [(nets["lora"], Strength(0.7)), (nets["loha"], Strength(0.6)), (nets["lokr"], Strength(0.9))]
    p.apply(three)
    got = forward(tm, inputs)
    torch.testing.assert_close(got, reference(three, tm, inputs), **TOL)
    for i in range(3):                       # each one matters: dropping any changes the output
        p.apply(three[:i] + three[i + 1:])
        assert not torch.allclose(forward(tm, inputs), got, **TOL), f"network {i} had no effect"
    p.restore()


def test_fp8_restore_is_bit_exact(nets, inputs):
    """Bypass: the fp8 bits never change (same storage), restore removes every hook and the output is the
    plain one bit for bit. Stochastic merge: the weights change, restore brings back the fp8 bits."""
    tm = tiny_model("sd1", 0)
    make_lowbit(tm)
    snap = _bits(tm.unet)
    ptrs = {k: v.data_ptr() for k, v in tm.unet.named_parameters()}
    plain = forward(tm, inputs)
    p = Patcher(tm.root)
    p.apply([(nets["lora"], Strength(1.0)), (nets["ia3"], Strength(0.5))])
    _same_bits(tm.unet, snap)
    assert sum(len(m._forward_hooks) for m in tm.unet.modules()) > 0
    p.restore()
    assert sum(len(m._forward_hooks) for m in tm.unet.modules()) == 0
    assert torch.equal(forward(tm, inputs), plain)
    q = Patcher(tm.root, lowbit="stochastic", lowbit_seed=3)
    q.apply([(nets["lora"], Strength(1.0)), (nets["loha"], Strength(0.5))])
    changed = sum(not torch.equal(v, snap[k]) for k, v in _bits(tm.unet).items())
    assert changed > 50
    q.restore()
    _same_bits(tm.unet, snap)
    assert {k: v.data_ptr() for k, v in tm.unet.named_parameters()} == ptrs


def test_fp8_schedule_rewrites_nothing(nets, inputs):
    """A scheduled multiplier on fp8 weights moves inside the hooks: set_step writes no weight, and the
    output at each step is the reference at that step's strength (a LoRA and a non-LoRA type)."""
    tm = tiny_model("sd1", 0)
    make_lowbit(tm)
    snap = _bits(tm.unet)
    p = Patcher(tm.root)
    req = parse_tag("<lora:x:0.4@1,1@2>")
    p.apply([(nets["lora"], req), (nets["glora"], req)], step=1, total=2)
    a = forward(tm, inputs)
    assert p.set_step(2, 2) == 0
    b = forward(tm, inputs)
    _same_bits(tm.unet, snap)
    for out, s in ((a, 0.4), (b, 1.0)):
        torch.testing.assert_close(out, reference([(nets["lora"], Strength(s)), (nets["glora"], Strength(s))],
                                                  tm, inputs), **TOL)
    p.restore()


def test_mixed_model_merges_float_weights_and_bypasses_fp8(nets, inputs):
    """Down blocks fp8, up blocks fp16, the rest fp32: 'merge' writes the fp16 and fp32 weights (the same
    bits as on a model without fp8) and hooks the fp8 ones, automatically."""
    tm = tiny_model("sd1", 0)
    fp8 = make_lowbit(tm, E4M3, lambda n, m: n.startswith("down_blocks."))
    fp16 = make_lowbit(tm, torch.float16, lambda n, m: n.startswith("up_blocks."))
    assert fp8 and fp16
    snap = _bits(tm.unet)
    twin = twin_of(tm)                       # fp8 modules as float32 (w.float()), the others as they are
    make_lowbit(twin, torch.float16, lambda n, m: n.startswith("up_blocks."))
    items = [(nets["lora"], Strength(0.8)), (nets["lokr"], Strength(0.5))]
    p = Patcher(tm.root)
    stats = p.apply(items, mode="merge")
    Patcher(twin.root).apply(items, mode="merge")
    now, tw = _bits(tm.unet), _bits(twin.unet)
    modules = dict(tm.unet.named_modules())
    hooked = hooked_modules(p)
    assert hooked and hooked <= {id(modules[n]) for n in fp8} and stats.lowbit_bypass == len(hooked)
    for k in snap:
        module = k.rsplit(".", 1)[0]
        if module in fp8:
            assert torch.equal(now[k], snap[k]), f"fp8 {k} written"
        else:
            assert torch.equal(now[k], tw[k]), f"{k}: not the plain merge's bits"
    assert sum(not torch.equal(now[k], snap[k]) for k in snap if k.rsplit(".", 1)[0] in fp16) > 10
    torch.testing.assert_close(forward(tm, inputs), forward(twin, inputs), **TOL)
    p.restore()
    _same_bits(tm.unet, snap)


# --- fp8 with stochastic rounding -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_stochastic_round_is_unbiased_and_reproducible(dtype):
    """Each value becomes one of its two fp8 neighbours; over N seeds the mean is the exact value within
    5 standard errors of the worst case (gap/2/√N per element); one seed always gives the same bits."""
    g = torch.Generator().manual_seed(0)
    fmin = torch.finfo(dtype).smallest_normal
    x = torch.cat([torch.randn(600, generator=g) * s for s in (0.02, 1.0, 30.0)] +
                  [torch.randn(200, generator=g) * fmin, torch.tensor([0.0, -0.0, 1.0, -2.0])])
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    n = 400
    outs = torch.stack([stochastic_round(x, dtype, seed).float() for seed in range(n)])   # (n, len(x))
    near = x.to(dtype).float()
    assert torch.equal(stochastic_round(x, dtype, 7).view(torch.uint8), stochastic_round(x, dtype, 7).view(torch.uint8))
    assert not torch.equal(outs[0], outs[1])
    lo, hi = outs.min(0).values, outs.max(0).values
    one = lo == hi                               # x within a hair of a code: the other never drawn
    assert bool((lo[one] == near[one]).all()) and bool(((lo <= x) & (x <= hi))[~one].all()), \
        "always one of x's two neighbours"
    assert bool(((outs == lo) | (outs == hi)).all())
    assert bool((hi - lo <= x.abs() / 4 + 4 * torch.finfo(dtype).smallest_normal).all()), "never a farther code"
    exact = near == x
    assert bool((outs[:, exact] == x[exact]).all()), "representable values stay exact"
    err = (outs.mean(0) - x).abs()
    bound = 5 * (x.abs() / 4 + 2 * torch.finfo(dtype).smallest_normal) / (2 * math.sqrt(n))
    assert bool((err <= bound).all()), f"biased: worst {float((err / bound).max()):.2f} of the bound"
    assert err.norm() < 0.2 * (near - x).norm(), "no better than rounding to nearest on average"


def test_stochastic_merge_on_fp8_is_unbiased_and_seeded(tmp_path, sd1):
    """lowbit='stochastic': fp8 weights merged, on average W + ΔW (the mean over seeds within 0.25 of the
    round-to-nearest error, which would keep the bias); one seed gives the same bits on a fresh model,
    another seed other bits; a network asked in bypass mode stays in bypass."""
    net = load_network(make_network(tmp_path / "l.safetensors", sd1.root, "lora", seed=4, limit=2,
                                    components=("unet",)))
    tm = tiny_model("sd1", 0)
    make_lowbit(tm)
    p = Patcher(tm.root, lowbit="stochastic")
    p.prepare(net)
    names = [t.weight for t, _ in p._bindings[id(net)].pairs]
    params = {k: p._params[k] for k in names}
    base = {k: v.detach().clone() for k, v in params.items()}
    exact = {}
    for k, target_mod in zip(names, p._bindings[id(net)].pairs):
        c = target_mod[1].contribution(None, target_mod[0].placement())
        exact[k] = base[k].float() + c.weight_delta(base[k].float(), 1.0)
    n = 100        # E‖mean − exact‖ ≈ √(2/n)·‖nearest − exact‖ for uniform rounding positions: 0.14 here
    total = {k: torch.zeros_like(v) for k, v in exact.items()}
    for seed in range(n):
        p.lowbit_seed = seed
        stats = p.apply([(net, Strength(1.0))])
        assert stats.lowbit_stochastic == len(names) and stats.lowbit_bypass == 0
        for k in names:
            total[k] += params[k].detach().float()
        p.restore()
    for k in names:
        assert torch.equal(params[k].view(torch.uint8), base[k].view(torch.uint8))   # restore bit-exact
        mean, nearest = total[k] / n, exact[k].to(E4M3).float()
        assert (mean - exact[k]).norm() < 0.25 * (nearest - exact[k]).norm(), k
    a, b, c = (tiny_model("sd1", 0) for _ in range(3))
    for tm_, seed in ((a, 5), (b, 5), (c, 6)):
        make_lowbit(tm_)
        Patcher(tm_.root, lowbit="stochastic", lowbit_seed=seed).apply([(net, Strength(1.0))])
    wa, wb, wc = (dict(m.root.named_parameters())[names[0]].view(torch.uint8) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert names[0] != names[1] and weight_seed(names[0], 5) != weight_seed(names[1], 5)
    q = Patcher(tm.root, lowbit="stochastic")
    stats = q.apply([(net, Strength(1.0), "bypass")])
    assert stats.lowbit_bypass == len(names) and stats.slots_written == 0
    q.restore()


# --- packed 4/8-bit tensor subclasses ---------------------------------------------------------------

def _quantise(tm, make, module_class, pick=lambda n, m: isinstance(m, nn.Linear) and m.weight.numel() % 64 == 0
              and ".transformer_blocks." in n) -> list:
    names = []
    for name, m in _leaves(tm.unet):
        if pick(name, m):
            w = make(m.weight)
            m.__class__ = module_class
            m.weight = w
            names.append(name)
    return names


@pytest.mark.parametrize("fmt", ["gguf-q8", "nf4"])
def test_packed_subclasses_in_bypass(sd1, nets, inputs, fmt):
    """GGUF Q8_0-like (a torch.Tensor subclass on an nn.Linear) and NF4-like (an nn.Parameter subclass with
    packed (n/2, 1) storage on a plain nn.Module, as Forge): networks bind by the logical shape, act
    through hooks (IA3 and DoRA from the dequantised weight), and leave the packed bits alone."""
    tm = tiny_model("sd1", 0)
    if fmt == "gguf-q8":
        names = _quantise(tm, GGUFLikeTensor.parameter, CastLinear)
        items = [(nets["lora"], Strength(0.9)), (nets["ia3"], Strength(0.7))]
    else:
        names = _quantise(tm, NF4LikeParam.quantize, Forge4bitLinear)
        items = [(nets["lora"], Strength(0.9)), (nets["lora-dora"], Strength(0.6))]
    assert len(names) > 10
    snap = {k: v for k, v in _bits(tm.unet).items() if k.rsplit(".", 1)[0] in names}   # the float ones merge
    p = Patcher(tm.root)
    unquantised = Patcher(sd1.root)
    for net, _ in items:             # bound by the logical shape (NF4: (n/2, 1) bytes otherwise)
        assert len(p.prepare(net).matched) == len(unquantised.prepare(net).matched)
    plain = forward(tm, inputs)
    ref = reference(items, tm, inputs)
    stats = p.apply(items)
    assert not stats.skipped and stats.lowbit_bypass == len(names)
    got = forward(tm, inputs)
    _same_bits(tm.unet, snap)
    assert not torch.allclose(got, plain, **TOL)
    torch.testing.assert_close(got, ref, **TOL)
    p.restore()
    assert torch.equal(forward(tm, inputs), plain)


def test_no_dequantizer_skips_with_a_reason_and_never_raises(nets, inputs):
    """A subclass with no dequantize(): LoRA-family types still act (they never read the weight); IA3 is
    skipped on those modules with a warning naming the reason. With the host's dequantiser passed in, IA3
    acts too. A dequantiser failing inside a forward drops that network there, reported, not raised."""
    tm = tiny_model("sd1", 0)
    names = _quantise(tm, OpaqueQ8Tensor.parameter, CastLinear)
    items = [(nets["lora"], Strength(1.0)), (nets["ia3"], Strength(1.0))]
    ref = reference(items, tm, inputs)
    p = Patcher(tm.root)
    stats = p.apply(items)
    skipped = {w for n, w, _ in stats.skipped}
    assert len(skipped) == len(names) and all(n == nets["ia3"].name for n, _, _ in stats.skipped)
    text = " ".join(stats.warnings())
    assert "IA3" in text.upper() and "OpaqueQ8Tensor" in text and "dequantize" in text
    got = forward(tm, inputs)
    assert p.set_step(2, 3) == 0
    assert not torch.allclose(got, ref, **TOL)    # IA3 is missing on the quantised modules
    p.restore()
    q = Patcher(tm.root, dequantize=host_dequantize)
    assert not q.apply(items).skipped
    torch.testing.assert_close(forward(tm, inputs), ref, **TOL)
    q.restore()

    def broken(w):
        raise RuntimeError("dequantiser needs CUDA")
    r = Patcher(tm.root, dequantize=broken)
    r.apply(items)
    out = forward(tm, inputs)                     # must not raise
    assert r.runtime_warnings and "CUDA" in r.runtime_warnings[0]
    torch.testing.assert_close(out, got, **TOL)   # as without a dequantiser: IA3 dropped there only
    r.restore()


# --- bypass fixes met on the way --------------------------------------------------------------------

def test_bypass_reaches_multihead_out_proj_and_lora_bias(tmp_path):
    """MultiheadAttention reads out_proj's weight without calling its forward: a hook there never fires, so
    that weight is merged even in bypass mode. A LoRA's bias delta (diff_b) is added by the hook too."""
    tm = tiny_model("sd2", 0)
    path = make_network(tmp_path / "te.safetensors", tm.root, "lora", seed=2, components=("te1",))
    sd = load_file(str(path))
    for k in [k for k in sd if k.endswith(".lora_up.weight")]:
        sd[k.replace(".lora_up.weight", ".diff_b")] = torch.randn(sd[k].shape[0]) * 0.1
    save_file(sd, str(path))
    net = load_network(path)
    oc = tm.te_openclip[0]
    ids = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = Patcher(tm.root)
        p.apply([(net, Strength(1.0), "merge")])
        merged = oc(ids)
        p.restore()
        plain = oc(ids)
        p.apply([(net, Strength(1.0), "bypass")])
        bypass = oc(ids)
        p.restore()
    assert not torch.allclose(plain, merged, **TOL)
    torch.testing.assert_close(bypass, merged, **TOL)


def test_host_replacing_quantised_parameter_objects(sd1, nets, inputs):
    """Forge's GGUF Linear sets a new ParameterGGUF object on every `.to()` (its `_apply`), which Forge runs
    before each sampling: a Patcher built before that must follow the module's current parameter, at a first
    apply and at a set change while parked, or every GGUF module is skipped ("a forward hook cannot reach")."""
    tm = tiny_model("sd1", 0)
    names = _quantise(tm, GGUFLikeTensor.parameter, CastLinear)
    p = Patcher(tm.root)                                   # built at model load, as the glue does

    def host_moves_the_model() -> None:
        for name in names:
            m = tm.unet.get_submodule(name)
            old = m.weight
            new = nn.Parameter(GGUFLikeTensor(old.data.as_subclass(torch.Tensor).clone()), requires_grad=False)
            new.tensor_shape = old.tensor_shape
            m.weight = new
    plain = forward(tm, inputs)
    sets = [[(nets["lora"], Strength(s)), (nets["ia3"], Strength(0.7))] for s in (0.9, 0.5)]
    refs = [reference(items, tm, inputs) for items in sets]      # before anything is merged into tm
    for items, ref in zip(sets, refs):
        host_moves_the_model()
        stats = p.apply(items)
        assert not stats.skipped and stats.lowbit_bypass == len(names)
        torch.testing.assert_close(forward(tm, inputs), ref, **TOL)
        p.park()
    p.restore()
    assert torch.equal(forward(tm, inputs), plain)


def test_a_tensors_own_dequantize_wins_over_the_hosts(nets, inputs):
    """Forge passes bitsandbytes' dequantize_4bit as the host dequantiser; on its GGUF parameters (which have
    their own method) that function fails. The tensor's own method is used first, so IA3 (which reads the
    weight) still acts on GGUF; the host's function stays for types without a method."""
    tm = tiny_model("sd1", 0)
    names = _quantise(tm, GGUFLikeTensor.parameter, CastLinear)
    calls = []

    def bnb_like(t):
        calls.append(type(t).__name__)
        raise AttributeError("'GGUFLikeTensor' object has no attribute 'quant_state'")
    items = [(nets["ia3"], Strength(0.7))]
    ref = reference(items, tm, inputs)
    p = Patcher(tm.root, dequantize=bnb_like)
    stats = p.apply(items)
    assert not stats.skipped and stats.lowbit_bypass == len(names)
    torch.testing.assert_close(forward(tm, inputs), ref, **TOL)
    assert not p.runtime_warnings and not calls
    p.restore()
