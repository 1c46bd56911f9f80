"""Flux.1 at its real width: apply and per-step switch, ours against Forge's algorithm (#11).

    python bench/flux.py                 # 1 double + 1 single block, bf16, CPU (2.6 GB of weights + backups)
    python bench/flux.py --double 2 --single 4 --dtype float32
    python bench/flux.py --quick         # width 768, under a minute

What it builds: the BFL module tree Forge loads (`double_blocks.N.{img,txt}_{mod.lin, attn.qkv, attn.proj,
mlp.0, mlp.2}`, `single_blocks.N.{linear1, linear2, modulation.lin}`; width 3072, MLP ratio 4, q/k/v fused
and, in single blocks, q/k/v + MLP input fused in `linear1`) with seeded random weights, and two rank-16
LoRA files of the same factors on every one of those Linears:
  * kohya / BFL names (`lora_unet_double_blocks_0_img_attn_qkv`): one module per fused weight;
  * diffusers / PEFT names (`transformer.transformer_blocks.0.attn.to_q`, `single_transformer_blocks.0.proj_mlp`):
    the fused weights' row slices, which the engine places in their rows.
Approaches, medians after a warm-up:
  * ours: `Patcher.apply` (first apply per image with kept backups, as in a host; and cold), a strength change,
    a schedule's step switch (`set_step`), `restore`;
  * Forge's algorithm (its `packages_3rdparty` LoRA code, ComfyUI's `calculate_weight`, research
    peers_perf.md): per weight, restore from the backup, ΔW = up @ down materialised in float32 per patch
    (a row-slice patch on a `narrow()` view of the fused weight), scaled, added in float32, cast back. Forge
    has no per-step weights, so a step switch costs a full restore + re-patch.
Per-block figures are extrapolated to the whole model (19 double + 38 single blocks). Last line:
`flux speedup: first apply Ax, step switch Bx vs Forge's algorithm (kohya file); Cx, Dx (diffusers file)`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_limits, md_table, release_host_memory, timeit  # noqa: E402
from lib_lycoris.network import load_network  # noqa: E402
from lib_lycoris.patcher import Patcher, Strength  # noqa: E402
from lib_lycoris.tags import parse_prompt  # noqa: E402

FULL_DOUBLE, FULL_SINGLE = 19, 38
RANK = 16


def build(width: int, double: int, single: int, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The BFL double/single blocks (Linears only: what LoRAs patch) with N(0, 1/in) weights."""
    g = torch.Generator().manual_seed(seed)

    def lin(i: int, o: int) -> torch.nn.Linear:
        m = torch.nn.Linear(i, o, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
            m.bias.zero_()
        return m

    root = torch.nn.Module()
    root.double_blocks = torch.nn.ModuleList()
    for _ in range(double):
        b = torch.nn.Module()
        for s in ("img", "txt"):
            mod, attn, mlp = torch.nn.Module(), torch.nn.Module(), torch.nn.Sequential()
            mod.lin = lin(width, 6 * width)
            attn.qkv, attn.proj = lin(width, 3 * width), lin(width, width)
            mlp.append(lin(width, 4 * width))
            mlp.append(torch.nn.GELU())
            mlp.append(lin(4 * width, width))
            setattr(b, f"{s}_mod", mod)
            setattr(b, f"{s}_attn", attn)
            setattr(b, f"{s}_mlp", mlp)
        root.double_blocks.append(b)
    root.single_blocks = torch.nn.ModuleList()
    for _ in range(single):
        b = torch.nn.Module()
        b.linear1, b.linear2 = lin(width, 7 * width), lin(5 * width, width)
        b.modulation = torch.nn.Module()
        b.modulation.lin = lin(width, 3 * width)
        root.single_blocks.append(b)
    return root


def _diffusers_parts(path: str, rows: int, width: int) -> list:
    """(diffusers module path, (start, stop)) of a BFL Linear: the row slices diffusers names."""
    parts = path.split(".")
    n = parts[1]
    if parts[0] == "single_blocks":
        base = f"single_transformer_blocks.{n}"
        if parts[2] == "linear1":
            h = width
            return [(f"{base}.attn.to_q", (0, h)), (f"{base}.attn.to_k", (h, 2 * h)), (f"{base}.attn.to_v", (2 * h, 3 * h)),
                    (f"{base}.proj_mlp", (3 * h, rows))]
        return [({"linear2": f"{base}.proj_out", "modulation": f"{base}.norm.linear"}[parts[2]], (0, rows))]
    base, stream = f"transformer_blocks.{n}", parts[2].split("_")[0]
    ctx = stream == "txt"
    tail = ".".join(parts[2:]).split("_", 1)[1]
    if tail == "attn.qkv":
        names = [f"{base}.attn.add_{p}_proj" if ctx else f"{base}.attn.to_{p}" for p in "qkv"]
        h = rows // 3
        return [(name, (i * h, (i + 1) * h)) for i, name in enumerate(names)]
    name = {"attn.proj": "attn.to_add_out" if ctx else "attn.to_out.0", "mod.lin": "norm1_context.linear" if ctx else "norm1.linear",
            "mlp.0": "ff_context.net.0.proj" if ctx else "ff.net.0.proj", "mlp.2": "ff_context.net.2" if ctx else "ff.net.2"}[tail]
    return [(f"{base}.{name}", (0, rows))]


def write_networks(model: torch.nn.Module, width: int, folder: Path, seed: int) -> tuple:
    """The same rank-16 factors as a kohya file and as a diffusers file; returns (paths, factors by layer)."""
    g = torch.Generator().manual_seed(seed)
    kohya, diff, factors = {}, {}, {}
    for path, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        o, i = m.weight.shape
        down = (torch.randn(RANK, i, generator=g) / i ** 0.5).half()
        up = (torch.randn(o, RANK, generator=g) * 0.02).half()
        factors[path] = (up, down)
        key = "lora_unet_" + path.replace(".", "_")
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
        kohya[f"{key}.alpha"] = torch.tensor(float(RANK))
        for name, (a, b) in _diffusers_parts(path, o, width):
            diff[f"transformer.{name}.lora_A.weight"] = down.clone()   # safetensors stores no shared tensors
            diff[f"transformer.{name}.lora_B.weight"] = up[a:b].contiguous()
    paths = {"kohya": folder / "flux_kohya.safetensors", "diffusers": folder / "flux_diffusers.safetensors"}
    save_file(kohya, str(paths["kohya"]))
    save_file(diff, str(paths["diffusers"]))
    return paths, factors


class ForgeRepatch:
    """Forge's (ComfyUI's) algorithm: per weight, restore from the backup, then per patch materialise ΔW in
    float32 (on a `narrow()` row view for split patches), scale, add, cast back."""

    def __init__(self, model: torch.nn.Module, factors: dict, width: int, split: bool) -> None:
        self.layers = {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.patches = {}
        for path, (up, down) in factors.items():
            rows = self.layers[path].weight.shape[0]
            spans = [r for _, r in _diffusers_parts(path, rows, width)] if split else [(0, rows)]
            self.patches[path] = [(a, b, up[a:b].float(), down.float()) for a, b in spans]
        self.backup: dict = {}

    @torch.no_grad()
    def apply(self, m: float) -> None:
        for path, layer in self.layers.items():
            w = layer.weight
            if path not in self.backup:
                self.backup[path] = w.detach().clone()
            else:
                w.copy_(self.backup[path])
            for a, b, up, down in self.patches[path]:
                view = w.narrow(0, a, b - a)
                delta = (up @ down) * m                       # alpha/rank = 1 here
                view.copy_((view.float() + delta).to(w.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for path, b in self.backup.items():
            self.layers[path].weight.copy_(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="width 768, 2 repetitions")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.reps = 768, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cpu")
    model = build(args.width, args.double, args.single, dtype, seed=0)
    wbytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    limits = machine_limits(dev, dtype, reps=5, copy_bytes=256 << 20, gemm_n=1024)
    rows = []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths, factors = write_networks(model, args.width, Path(tmp), seed=1)
        snap = {k: v.detach().clone() for k, v in model.named_parameters()}
        for style in ("kohya", "diffusers"):
            net = load_network(paths[style])
            (sched,) = parse_prompt("<lora:x:0.5@1,1@2>").requests
            p = Patcher(model)
            cold = _timed(lambda: p.apply([(net, Strength(1.0))]), p.restore, 1)
            first = _timed(lambda: p.apply([(net, Strength(1.0))]), p.restore, args.reps)   # restore untimed
            p.apply([(net, Strength(1.0))])
            strength = _strength_change(p, net, dev, args.reps)
            p.restore()
            p.apply([(net, sched)], step=1, total=2)
            step = timeit(lambda: (p.set_step(2, 2), p.set_step(1, 2)), dev, args.reps)
            p.restore()
            assert all(torch.equal(v, snap[k]) for k, v in model.named_parameters()), "restore is not exact"
            p.release_backups()
            forge = ForgeRepatch(model, factors, args.width, split=style == "diffusers")
            f_first = timeit(lambda: forge.apply(1.0), dev, args.reps)
            f_switch = timeit(lambda: forge.apply(0.5), dev, args.reps)
            forge.restore()
            forge = None
            release_host_memory()
            results[style] = {"ours_first": first, "ours_cold": cold, "ours_strength": strength,
                              "ours_step": step.median / 2, "forge_first": f_first.median, "forge_switch": f_switch.median}
    blocks = args.double + args.single
    per_double = sum(m.weight.numel() for m in model.double_blocks.modules() if isinstance(m, torch.nn.Linear))
    per_single = sum(m.weight.numel() for m in model.single_blocks.modules() if isinstance(m, torch.nn.Linear))
    bench_elems = per_double + per_single
    full_elems = per_double / max(args.double, 1) * FULL_DOUBLE + per_single / max(args.single, 1) * FULL_SINGLE
    extrap = full_elems / bench_elems
    bound = 2 * wbytes / (limits["copy_GBps"] * 1e9)
    for style, r in results.items():
        for name, key in (("first apply (per image, kept backups)", "ours_first"), ("first apply, cold", "ours_cold"),
                          ("strength change", "ours_strength"), ("step switch (schedule)", "ours_step"),
                          ("Forge: apply (restore + re-patch)", "forge_first"),
                          ("Forge: step/strength switch (restore + re-patch)", "forge_switch")):
            t = r[key]
            rows.append([style, name, f"{t * 1e3:.0f}", f"{t * extrap:.1f}", f"{bound / t:.0%}" if t else "-"])
    print(f"Flux blocks: {args.double} double + {args.single} single at width {args.width}, {args.dtype}, "
          f"{wbytes / 1e9:.2f} GB of Linear weights ({blocks} blocks); copy {limits['copy_GBps']:.1f} GB/s, "
          f"GEMM {limits['gemm_GFLOPs']:.0f} GFLOP/s; 2-pass bound {bound * 1e3:.0f} ms; "
          f"full model = {extrap:.1f}x these weights\n")
    print(md_table(["file", "operation", "ms (these blocks)", "s (full Flux, extrapolated)", "2-pass bound / time"], rows))
    k, d = results["kohya"], results["diffusers"]
    print(f"\nflux speedup: first apply {k['forge_first'] / k['ours_first']:.1f}x, step switch "
          f"{k['forge_switch'] / k['ours_step']:.1f}x vs Forge's algorithm (kohya file); "
          f"{d['forge_first'] / d['ours_first']:.1f}x, {d['forge_switch'] / d['ours_step']:.1f}x (diffusers file)")
    return 0


def _timed(fn, after, reps: int) -> float:
    """Median seconds of fn() over reps, with after() run untimed after each (e.g. the host's restore)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        after()
    return sorted(times)[len(times) // 2]


def _strength_change(p: Patcher, net, dev: torch.device, reps: int) -> float:
    """Median of one strength change (1.0 <-> 0.5 alternately)."""
    state = {"m": 1.0}

    def change():
        state["m"] = 0.5 if state["m"] == 1.0 else 1.0
        p.apply([(net, Strength(state["m"]))])
    return timeit(change, dev, reps).median


if __name__ == "__main__":
    sys.exit(main())
