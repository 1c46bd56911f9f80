"""Benchmark: networks on fp8 weights (#12) - how much of a LoRA survives, and what the bypass costs.

    python bench/lowbit.py            # SDXL 1024x1024 token counts (batch 2) for the timings
    python bench/lowbit.py --quick    # 512x512, batch 1, fewer seeds: under a minute on a 2-core CPU
    python bench/lowbit.py --device cuda

What it builds:
* "SDXL slice": one transformer block's Linear layers of each SDXL level with their real shapes and diffusers
  names (640: attn1.to_q 640x640, ff.net.0.proj 5120x640, ff.net.2 640x2560, attn2.to_k 640x2048; 1280: the
  same at 1280, ff.net.0.proj 10240x1280), weights N(0, 1/in) (the scale trained SD weights keep; in e4m3
  most of them lie below the smallest normal, 2^-6, as in a real SDXL checkpoint cast by A1111), stored in
  float8_e4m3fn with a forward that casts the weight to the input's dtype per call (A1111's "FP8 weight");
  a kohya LoRA of rank 16 on every layer with ‖ΔW‖ = ratio·‖W‖ (3.5 %; 2 % and 5 % too without --quick).
* the tiny SD1 UNet of tests/fixtures/models.py, every Linear/Conv2d cast to e4m3 the same way, with a rank-4
  LoRA (its layers are 32-64 wide) at the same ratio.

Measured:
1. Weights: ‖ΔW_eff − ΔW‖/‖ΔW‖ ("error") and ⟨ΔW_eff, ΔW⟩/‖ΔW‖² ("kept", the part of the intended change
   that survives, 1 = all) with: plain rounding (cast(W + ΔW) into e4m3: what `write_weight` does, the
   Patcher's old path and A1111's/Forge's fp8 merge), stochastic rounding (lowbit='stochastic', one seed:
   what one image gets) and bypass (the default). For the bypass the weight is not written, so its ΔW_eff
   is read off the layer: (y_bypass − y_plain) on 256 random inputs against x·ΔWᵀ (the same ratio in
   expectation for isotropic inputs).
2. Tiny UNet output against the float32 reference (same e4m3-cast weights, LoRA merged in float32):
   ‖y − y_ref‖/‖y_ref − y_base‖ and the kept fraction, per method (stochastic: mean over seeds).
3. Forward time per layer and per step (the layer times × SDXL's count of each layer, transformer Linear
   layers only): plain fp8 forward, with our bypass (Patcher hooks), and a re-implementation of Forge's
   "online" LoRA (its "Automatic (fp16 LoRA)": per call dequantise to float32, add s·up@down, cast, forward).
   Stochastic merge runs at the plain forward's speed. Medians over repetitions after a warm-up.

Output: Markdown tables on stdout, JSON in bench/out/lowbit.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import env_summary, fmt_ms, md_table  # noqa: E402

E4M3 = torch.float8_e4m3fn
RANK = 16
TINY_RANK = 4
PROBE_TOKENS = 256
# (diffusers name inside the UNet, (out, in)); the 640 level is down_blocks.1, the 1280 level down_blocks.2
SDXL_LAYERS = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640)),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", (5120, 640)),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", (640, 2560)),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (640, 2048)),
    ("down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q", (1280, 1280)),
    ("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj", (10240, 1280)),
    ("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2", (1280, 5120)),
    ("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k", (1280, 2048)),
]
# How many layers of each shape an SDXL UNet has: 10 transformer blocks at 640 (5 attentions), 60 at 1280
# (6 attentions); per block 6 square projections (attn1 q/k/v/out, attn2 q/out), 2 context projections
# (attn2 k/v, 77 tokens), GEGLU in, FF out; per attention proj_in and proj_out (square).
SDXL_COUNTS = {"attn1.to_q": {640: 10 * 6 + 5 * 2, 1280: 60 * 6 + 6 * 2}, "ff.net.0.proj": {640: 10, 1280: 60},
               "ff.net.2": {640: 10, 1280: 60}, "attn2.to_k": {640: 20, 1280: 120}}
CONTEXT_TOKENS = 77


# --- the host's fp8 layers (A1111's "FP8 weight": the weight cast to the compute dtype per call) ----------

class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), b)


class ForgeOnlineLinear(nn.Module):
    """Forge's online LoRA, re-implemented from backend/patcher/lora.py + operations.py: per forward the
    weight is dequantised to float32, the LoRA merged (W + s·up@down), cast to the compute dtype, used."""

    def __init__(self, fp8: nn.Linear, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight, self.bias = fp8.weight, fp8.bias
        self.up, self.down, self.scale = up.float(), down.float(), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        w.addmm_(self.up, self.down, alpha=self.scale)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)


def to_fp8(module: nn.Module) -> None:
    """Every Linear/Conv2d below `module` stored in e4m3 (weight and bias) with a casting forward, in place."""
    for m in list(module.modules()):
        if isinstance(m, nn.Linear):
            m.__class__ = CastLinear
        elif isinstance(m, nn.Conv2d):
            m.__class__ = CastConv2d
        else:
            continue
        m.to(E4M3)


def sdxl_slice(device: torch.device, seed: int) -> nn.Module:
    """The SDXL layers above under their diffusers names, float32 N(0, 1/in) weights and zero biases."""
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, (out, inn) in SDXL_LAYERS:
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        lin = nn.Linear(inn, out, device="meta")
        lin.weight = nn.Parameter(torch.randn(out, inn, generator=g).div_(math.sqrt(inn)).to(device),
                                  requires_grad=False)
        lin.bias = nn.Parameter(torch.zeros(out, device=device), requires_grad=False)
        parent.add_module(parts[-1], lin)
    return root


def write_lora(path: Path, components: dict, rank: int, ratio: float, seed: int) -> dict:
    """A kohya LoRA (alpha = rank: scale 1) on every Linear/Conv2d target of the model, with ‖up@down‖ =
    ratio·‖W‖ per layer. Returns {weight name: (up, down)} in float32 (conv: flattened)."""
    from safetensors.torch import save_file

    from lib_lycoris.patcher import Patcher
    g = torch.Generator().manual_seed(seed)
    p = Patcher.from_components(components)
    params = p._params
    sd, factors = {}, {}
    for t in p.modelmap.targets:
        w = params[t.weight]
        if t.rows is not None or len(t.shape) not in (2, 4):
            continue
        out, inn = t.shape[0], math.prod(t.shape[1:])
        r = min(rank, out, inn)
        up, down = torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)
        up *= ratio * w.float().norm().cpu() / (up @ down).norm()
        factors[t.weight] = (up, down)
        conv = len(t.shape) == 4
        sd[f"{t.name}.lora_up.weight"] = up.reshape(out, r, 1, 1) if conv else up
        sd[f"{t.name}.lora_down.weight"] = down.reshape(r, *t.shape[1:]) if conv else down
        sd[f"{t.name}.alpha"] = torch.tensor(float(r))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return factors


def plain_rounding(patcher, network) -> None:
    """cast(W + ΔW) written into the e4m3 weights by the engine's `write_weight` (round to nearest): the
    Patcher's path before #12, and what A1111's and Forge's fp8 merges do."""
    from lib_lycoris.patcher import write_weight
    patcher.prepare(network)
    with torch.no_grad():
        for target, mod in patcher._bindings[id(network)].pairs:
            param = patcher._params[target.weight]
            c = mod.contribution(None, target.placement())
            low = c.low_rank(param.device)
            write_weight(param.data, param.data.clone(), [(c, 1.0, tuple(f.float() for f in low))])


def _stats(eff: torch.Tensor, want: torch.Tensor) -> tuple:
    """(error ‖eff − want‖/‖want‖, kept ⟨eff, want⟩/‖want‖²)."""
    eff, want = eff.double(), want.double()
    n2 = float((want * want).sum())
    return float((eff - want).norm()) / math.sqrt(n2), float((eff * want).sum()) / n2


# --- 1. weights ----------------------------------------------------------------------------------------

def bench_weights(device: torch.device, ratios: list, seed: int, tmp: Path, cdtype: torch.dtype) -> list:
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    rows = []
    g = torch.Generator().manual_seed(seed + 1)
    for ratio in ratios:
        ref = sdxl_slice(device, seed)
        factors = write_lora(tmp / f"sdxl_{ratio}.safetensors", {"unet": ref}, RANK, ratio, seed + 2)
        net = load_network(tmp / f"sdxl_{ratio}.safetensors")
        models = {}
        for method in ("plain", "stochastic", "bypass"):
            m = sdxl_slice(device, seed)
            to_fp8(m)
            models[method] = m
        base = {n: p.detach().float() for n, p in models["plain"].named_parameters()}
        plain_rounding(Patcher.from_components({"unet": models["plain"]}), net)
        Patcher.from_components({"unet": models["stochastic"]}, lowbit="stochastic", lowbit_seed=seed).apply(
            [(net, Strength(1.0))])
        probes = {name: torch.randn(PROBE_TOKENS, shape[1], generator=g).to(device, cdtype)
                  for name, shape in SDXL_LAYERS}
        byp = models["bypass"]
        mods = dict(byp.named_modules())
        with torch.no_grad():
            y0 = {name: mods[name](x).float() for name, x in probes.items()}
            Patcher.from_components({"unet": byp}).apply([(net, Strength(1.0))])
            y1 = {name: mods[name](x).float() for name, x in probes.items()}
        for name, shape in SDXL_LAYERS:
            up, down = factors[f"unet.{name}.weight"]
            dw = (up @ down).to(device)                     # alpha = rank: scale 1
            row = {"ratio": ratio, "layer": name.split("transformer_blocks.0.")[1], "shape": shape}
            for method in ("plain", "stochastic"):
                w = dict(models[method].named_parameters())[f"{name}.weight"].detach().float()
                row[method] = _stats(w - base[f"{name}.weight"], dw)
            x = probes[name].float()
            row["bypass"] = _stats(y1[name] - y0[name], x @ dw.T)
            rows.append(row)
    return rows


# --- 2. tiny UNet output -------------------------------------------------------------------------------

def bench_unet(device: torch.device, ratio: float, seeds: int, seed: int, tmp: Path) -> dict:
    from fixtures.models import tiny_model, unet_inputs

    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength

    def fp8_model():
        tm = tiny_model("sd1", 0)
        tm.root.to(device)
        to_fp8(tm.unet)
        return tm

    inputs = {k: v.to(device) for k, v in unet_inputs("sd1", batch=2).items()}

    def run(tm) -> torch.Tensor:
        with torch.no_grad():
            return tm.unet(**inputs).sample.float()

    ref = tiny_model("sd1", 0)
    ref.root.to(device)
    fp8 = fp8_model()
    with torch.no_grad():        # the reference: float32 weights equal to the e4m3 ones
        for (_, a), (_, b) in zip(ref.unet.named_parameters(), fp8.unet.named_parameters()):
            a.copy_(b.float())
    write_lora(tmp / "tiny.safetensors", {"unet": ref.unet}, TINY_RANK, ratio, seed + 3)
    net = load_network(tmp / "tiny.safetensors")
    y_base = run(ref)
    assert torch.allclose(y_base, run(fp8), rtol=1e-6, atol=1e-6), "the fp8 layers do not compute as the reference"
    Patcher.from_components({"unet": ref.unet}).apply([(net, Strength(1.0))])
    y_ref = run(ref)
    want = y_ref - y_base
    out = {"change": float(want.norm() / y_base.norm())}
    plain_rounding(Patcher.from_components({"unet": fp8.unet}), net)
    out["plain"] = _stats(run(fp8) - y_base, want)
    errs, kept = [], []
    for s in range(seeds):
        tm = fp8_model()
        Patcher.from_components({"unet": tm.unet}, lowbit="stochastic", lowbit_seed=s).apply([(net, Strength(1.0))])
        e, k = _stats(run(tm) - y_base, want)
        errs.append(e)
        kept.append(k)
    out["stochastic"] = (sum(errs) / seeds, sum(kept) / seeds)
    tm = fp8_model()
    Patcher.from_components({"unet": tm.unet}).apply([(net, Strength(1.0))])
    out["bypass"] = _stats(run(tm) - y_base, want)
    return out


# --- 3. forward time -----------------------------------------------------------------------------------

def bench_forward(device: torch.device, cdtype: torch.dtype, tokens: dict, reps: int, seed: int,
                  tmp: Path) -> list:
    """Per layer: the plain fp8 layer, the same layer in a second copy with our hooks on it, and Forge's online
    LoRA, timed in interleaved rounds (plain, bypass, online, plain, ...) so that a busy machine's drift
    hits all three alike."""
    from common import Samples, Timer, sync

    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    ref = sdxl_slice(device, seed)
    factors = write_lora(tmp / "timing.safetensors", {"unet": ref}, RANK, 0.035, seed + 2)
    net = load_network(tmp / "timing.safetensors")
    plain_model, bypass_model = sdxl_slice(device, seed), sdxl_slice(device, seed)
    to_fp8(plain_model)
    to_fp8(bypass_model)
    Patcher.from_components({"unet": bypass_model}).apply([(net, Strength(1.0))])
    plain_mods, bypass_mods = dict(plain_model.named_modules()), dict(bypass_model.named_modules())
    g = torch.Generator().manual_seed(seed + 4)
    timer = Timer(device)
    rows = []
    for name, (out, inn) in SDXL_LAYERS:
        level = 640 if name.startswith("down_blocks.1") else 1280
        short = name.split("transformer_blocks.0.")[1]
        n = CONTEXT_TOKENS * tokens["batch"] if short == "attn2.to_k" else tokens[level]
        x = torch.randn(n, inn, generator=g).to(device, cdtype)
        up, down = factors[f"unet.{name}.weight"]
        variants = {"plain": plain_mods[name], "bypass": bypass_mods[name],
                    "online": ForgeOnlineLinear(plain_mods[name], up.to(device), down.to(device), 1.0)}
        samples = {k: Samples() for k in variants}
        with torch.no_grad():
            for f in variants.values():     # warm-up
                f(x)
            sync(device)
            for _ in range(reps):
                for k, f in variants.items():
                    with timer(samples[k]):
                        f(x)
        rows.append({"layer": short, "shape": (out, inn), "tokens": n, "count": SDXL_COUNTS[short][level],
                     **{f"{k}_s": v.median for k, v in samples.items()},
                     "spread": max(v.spread for v in samples.values())})
    return rows


# --- report --------------------------------------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _pair(v: tuple) -> str:
    return f"{_num(v[0])} / {_num(v[1])}"


def report(weights: list, unet: dict, fwd: list, info: dict) -> str:
    out = [f"# Networks on fp8 (e4m3) weights: {info['device']}, compute {info['compute']}, "
           f"torch {info['torch']}, {info['threads']} thread(s)", ""]
    out += ["## 1. How much of the LoRA survives on the weights (SDXL shapes, rank 16)", "",
            "error = ‖ΔW_eff − ΔW‖/‖ΔW‖ (0 is exact), kept = ⟨ΔW_eff, ΔW⟩/‖ΔW‖² (1 keeps it all); "
            "stochastic: one seed", ""]
    rows = [[f"{r['ratio'] * 100:.1f} %", r["layer"], f"{r['shape'][0]}x{r['shape'][1]}",
             _pair(r["plain"]), _pair(r["stochastic"]), _pair(r["bypass"])] for r in weights]
    out.append(md_table(["‖ΔW‖/‖W‖", "layer", "shape", "plain rounding: error / kept",
                         "stochastic: error / kept", "bypass: error / kept"], rows))
    out += ["", f"## 2. Tiny UNet output against the float32 reference (LoRA rank {TINY_RANK}, "
            f"‖ΔW‖ = {unet['ratio'] * 100:.1f} % ‖W‖; the LoRA moves the output by "
            f"{unet['change'] * 100:.2f} %)", "",
            "error = ‖y − y_ref‖/‖y_ref − y_base‖, kept = ⟨y − y_base, y_ref − y_base⟩/‖y_ref − y_base‖²; "
            f"stochastic: mean over {unet['seeds']} seeds", ""]
    out.append(md_table(["method", "error", "kept"],
                        [[m, _num(unet[m][0]), _num(unet[m][1])] for m in ("plain", "stochastic", "bypass")]))
    out += ["", f"## 3. Forward time per call (ms), {info['tokens_note']}", ""]
    rows = []
    tot = {"plain_s": 0.0, "bypass_s": 0.0, "online_s": 0.0}
    for r in fwd:
        (out_f, in_f), n = r["shape"], r["tokens"]
        # extra FLOPs over the layer's GEMM (2·n·in·out): bypass 2·n·r·(in + out), online 2·r·in·out per call
        theory = f"+{RANK * (in_f + out_f) / (in_f * out_f) * 100:.1f} / +{RANK / n * 100:.1f}"
        rows.append([r["layer"], f"{out_f}x{in_f}", n, fmt_ms(r["plain_s"]),
                     f"{fmt_ms(r['bypass_s'])} ({r['bypass_s'] / r['plain_s']:.2f}x)",
                     f"{fmt_ms(r['online_s'])} ({r['online_s'] / r['plain_s']:.2f}x)", theory,
                     f"{r['spread'] * 100:.0f} %"])
        for k in tot:
            tot[k] += r["count"] * r[k]
    out.append(md_table(["layer", "shape", "tokens", "plain fp8", "bypass (ours)", "Forge online",
                         "extra FLOPs % (bypass / online)", "spread"], rows))
    out += ["", "Per step, SDXL's transformer Linear layers (each layer time x its count in the UNet):", ""]
    out.append(md_table(["plain fp8 (= stochastic merge)", "bypass (ours)", "Forge online"],
                        [[f"{tot['plain_s'] * 1e3:.0f} ms", f"{tot['bypass_s'] * 1e3:.0f} ms "
                          f"({(tot['bypass_s'] / tot['plain_s'] - 1) * 100:+.1f} %)",
                          f"{tot['online_s'] * 1e3:.0f} ms ({(tot['online_s'] / tot['plain_s'] - 1) * 100:+.0f} %)"]]))
    return "\n".join(out)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="512x512 batch 1 timings, one LoRA ratio, 4 seeds")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default on CPU: 1 when the load average exceeds the cores)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cdtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)
    reps = args.reps or 5
    ratios = [0.035] if args.quick else [0.02, 0.035, 0.05]
    seeds = 4 if args.quick else 16
    if args.quick:     # 512x512 latent 64x64: 32x32 tokens at 640, 16x16 at 1280; batch 1
        tokens = {"batch": 1, 640: 1024, 1280: 256}
        note = "SDXL at 512x512, batch 1 (1024 tokens at 640, 256 at 1280, 77 context)"
    else:              # 1024x1024, batch 2 (cond + uncond)
        tokens = {"batch": 2, 640: 8192, 1280: 2048}
        note = "SDXL at 1024x1024, batch 2 (8192 tokens at 640, 2048 at 1280, 154 context)"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        weights = bench_weights(device, ratios, args.seed, tmp, cdtype)
        unet = bench_unet(device, 0.035, seeds, args.seed, tmp)
        unet.update(ratio=0.035, seeds=seeds)
        fwd = bench_forward(device, cdtype, tokens, reps, args.seed, tmp)
    info = dict(env_summary(device), compute=str(cdtype).replace("torch.", ""), tokens_note=note)
    text = report(weights, unet, fwd, info)
    print(text)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowbit.json").write_text(json.dumps({"info": info, "weights": weights, "unet": unet, "forward": fwd},
                                                indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
