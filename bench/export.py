"""Benchmark of `export` and `resize` (lib_lycoris/export.py, #13) against the dense approaches, in one process.

    python bench/export.py               # SD1.5 export of 3 stacked networks + SDXL rank-128 resize to 32
    python bench/export.py --quick       # a quarter / an eighth of the modules, extrapolated: under a minute
    python bench/export.py --skip dense  # leave out the (slow) dense-SVD rows

What it builds (module names and shapes of the real models: diffusers' `UNet2DConditionModel` configs of
`bench/patcher.py` made on the meta device, plus the CLIP text encoders' shapes; no weights needed):
  * SD1.5 export: three kohya-format fp16 networks on every Linear/Conv2d of the kohya target set (Transformer2D,
    ResnetBlock2D, Down-/Upsample2D: 278 UNet modules) and the 72 CLIP-L text-encoder modules:
    LoRA/LoCon rank 32 (alpha 16), LoHa rank 8 (alpha 8), LoKr factor 2 with w2 of rank 32 (alpha 32), at
    strengths 0.8 / 0.6 / 0.7, exported to one LoRA of rank 32 (`--rank 32`, fp16);
  * SDXL resize: a kohya-style rank-128 LoRA (alpha 64) on the SDXL attention blocks (kohya's default SDXL
    LoRA targets: every Linear of the Transformer2D blocks, 700 modules) and both text encoders (CLIP-L 72,
    OpenCLIP-bigG 192 modules), resized to rank 32.

Approaches, side by side:
  * ours: `export_networks` / `resize_network` end to end (read the files, plan, SVD, measure, write the file),
    run once on every module; the SVD runs in factor space (QR of the stacked factors + SVD of the small core:
    exact) wherever that is cheaper than the dense SVD;
  * dense: ΔW formed densely (LoRA up@down, LoHa (w1a@w1b)⊙(w2a@w2b), LoKr kron, summed with strengths),
    then `torch.linalg.svd` and truncation: what kohya's `svd_merge_lora.py` / `resize_lora.py` do;
  * svd_lowrank: the same dense ΔW, then `torch.svd_lowrank(q=rank, niter=2)`: what SD.Next's `lora_extract`
    does.
The dense approaches cost minutes on this CPU, so they run on a sample: one module of each distinct (shape,
input types) group, timed, and the total extrapolated as Σ over groups of (modules in the group × the sample's
time). Their peak memory is the RSS high-water mark over the sample (it holds the largest module).

Error against the optimum: on the same sampled modules, the target ΔW is formed in float64 and its
singular values taken by `torch.linalg.svdvals` (float64): the optimal rank-k error is √Σ_{i>k} s_i²
(Eckart–Young). Each approach's written factors are compared with the float64 target; the table shows
√(Σ err²)/√(Σ opt²) − 1 over the sample (weights: modules per group) and the worst single module.

Noise: one run per approach on a shared 2-core VM (the load average is printed); torch uses 1 thread when the
load average exceeds the cores (`--threads` overrides), as bench/patcher.py does.
Output: Markdown on stdout, JSON in bench/out/export.json, and a last line
`export: SD1.5 3-network export A s (goal 10 s), SDXL resize B s (goal 30 s), worst error C % over optimum`.
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

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import PeakMemory, env_summary, md_table, release_host_memory  # noqa: E402

MB = 1e6
GOAL_SD15_S, GOAL_SDXL_S, GOAL_ERROR = 10.0, 30.0, 0.01
SD15_STACK = (("lora", 0.8), ("loha", 0.6), ("lokr", 0.7))
LORA_RANK, LORA_ALPHA = 32, 16.0
LOHA_RANK = 8
LOKR_FACTOR, LOKR_RANK = 2, 32
EXPORT_RANK = 32
SDXL_RANK, SDXL_ALPHA, RESIZE_RANK = 128, 64.0, 32
SDNEXT_NITER = 2   # SD.Next lora_extract: torch.svd_lowrank(q=maxrank, niter=2)


# --- module names and shapes -----------------------------------------------------------------------

def _unet_targets(config: dict, attention_only: bool) -> list:
    """[(kohya name, weight shape)] of the kohya target modules of a diffusers UNet built on 'meta'."""
    from diffusers import UNet2DConditionModel
    from patcher import kohya_targets
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    out = []
    for path, mod in kohya_targets(unet):
        if attention_only and (isinstance(mod, torch.nn.Conv2d) or "attentions" not in path):
            continue
        out.append(("lora_unet_" + path.replace(".", "_"), tuple(mod.weight.shape)))
    del unet
    return out


def _te_targets(prefix: str, layers: int, hidden: int, mlp: int) -> list:
    """CLIP text-encoder modules as kohya names them (attention q/k/v/out, MLP fc1/fc2)."""
    out = []
    for i in range(layers):
        base = f"{prefix}text_model_encoder_layers_{i}_"
        out += [(f"{base}self_attn_{p}_proj", (hidden, hidden)) for p in "qkv"]
        out += [(f"{base}self_attn_out_proj", (hidden, hidden)), (f"{base}mlp_fc1", (mlp, hidden)),
                (f"{base}mlp_fc2", (hidden, mlp))]
    return out


def sd15_targets() -> list:
    from patcher import SD15
    return _unet_targets(SD15, attention_only=False) + _te_targets("lora_te_", 12, 768, 3072)


def sdxl_targets() -> list:
    from patcher import SDXL
    return (_unet_targets(SDXL, attention_only=True) + _te_targets("lora_te1_", 12, 768, 3072)
            + _te_targets("lora_te2_", 32, 1280, 5120))


def subset(targets: list, every: int) -> list:
    return targets[::every] if every > 1 else targets


# --- networks --------------------------------------------------------------------------------------

def _rnd(gen: torch.Generator, *shape, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).half()


def _with_spectrum(gen: torch.Generator, rows: int, rank: int, std: float) -> torch.Tensor:
    """(rows, rank) with column scales decaying like a trained LoRA's singular values (1/√(1+i))."""
    decay = 1.0 / torch.sqrt(1.0 + torch.arange(rank, dtype=torch.float32))
    return (torch.randn(rows, rank, generator=gen) * std * decay).half()


def write_stack(targets: list, folder: Path, seed: int) -> dict:
    """LoRA/LoCon r32, LoHa r8 and LoKr (factor 2, w2 rank 32) fp16 files on `targets`; {kind: path}."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    sds = {"lora": {}, "loha": {}, "lokr": {}}
    for name, shape in targets:
        out_f, in_f, kk = shape[0], shape[1], tuple(shape[2:])
        fan = in_f * math.prod(kk)
        lo = sds["lora"]
        lo[f"{name}.lora_down.weight"] = _rnd(gen, LORA_RANK, in_f, *kk, std=1 / math.sqrt(fan))
        up = _with_spectrum(gen, out_f, LORA_RANK, 2e-3)
        lo[f"{name}.lora_up.weight"] = up.reshape(out_f, LORA_RANK, *((1, 1) if kk else ()))
        lo[f"{name}.alpha"] = torch.tensor(LORA_ALPHA).half()
        ha = sds["loha"]
        for i in (1, 2):
            ha[f"{name}.hada_w{i}_a"] = _with_spectrum(gen, out_f, LOHA_RANK, 0.1)
            ha[f"{name}.hada_w{i}_b"] = _rnd(gen, LOHA_RANK, fan, std=0.1 / math.sqrt(fan))
        ha[f"{name}.alpha"] = torch.tensor(float(LOHA_RANK)).half()
        kr = sds["lokr"]
        a = c = LOKR_FACTOR
        b, d = out_f // a, in_f // c
        kr[f"{name}.lokr_w1"] = _rnd(gen, a, c, std=1.0)
        kr[f"{name}.lokr_w2_a"] = _with_spectrum(gen, b, LOKR_RANK, 0.05)
        kr[f"{name}.lokr_w2_b"] = _rnd(gen, LOKR_RANK, d * math.prod(kk), std=0.05 / math.sqrt(fan))
        kr[f"{name}.alpha"] = torch.tensor(float(LOKR_RANK)).half()
    paths = {}
    for kind, sd in sds.items():
        p = folder / f"sd15_{kind}.safetensors"
        save_file(sd, str(p), metadata={"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"})
        paths[kind] = p
    return paths


def write_lora(targets: list, folder: Path, seed: int) -> Path:
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in targets:
        out_f, in_f = shape[0], shape[1]
        sd[f"{name}.lora_down.weight"] = _rnd(gen, SDXL_RANK, in_f, std=1 / math.sqrt(in_f))
        sd[f"{name}.lora_up.weight"] = _with_spectrum(gen, out_f, SDXL_RANK, 2e-3)
        sd[f"{name}.alpha"] = torch.tensor(SDXL_ALPHA).half()
    p = folder / "sdxl_lora_r128.safetensors"
    save_file(sd, str(p), metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"})
    return p


# --- the dense approaches (kohya, SD.Next), written from their descriptions ------------------------

def dense_delta(modules: dict, name: str, stack: list, dtype: torch.dtype) -> torch.Tensor:
    """Σ m·s·ΔW of one module, dense (out, in·k·k), in `dtype`: up@down, (w1a@w1b)⊙(w2a@w2b), kron(w1, w2)."""
    total = None
    for kind, m in stack:
        t = {k: v.to(dtype) for k, v in modules[kind][name].items()}
        if kind == "lora":
            down = t["lora_down.weight"].flatten(1)
            d = t["lora_up.weight"].flatten(1) @ down * (float(t["alpha"]) / down.shape[0])
        elif kind == "loha":
            r = t["hada_w1_b"].shape[0]
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (float(t["alpha"]) / r)
        else:
            r = t["lokr_w2_b"].shape[0]
            d = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (float(t["alpha"]) / r)
        total = d * m if total is None else total + d * m
    return total


def truncated(w: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """The rank-k approximation a dense approach writes (U_k S_k V_kᵀ)."""
    if method == "dense":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :k] * s[:k]) @ vh[:k]
    u, s, v = torch.svd_lowrank(w, q=k, niter=SDNEXT_NITER)
    return (u[:, :k] * s[:k]) @ v[:, :k].T


def groups_of(targets: list, kinds: list) -> dict:
    """(shape, kinds) -> [names]: the sampling groups."""
    out: dict = {}
    for name, shape in targets:
        out.setdefault((tuple(shape), tuple(kinds)), []).append(name)
    return out


def read_modules(paths: dict) -> dict:
    from safetensors.torch import load_file
    out = {}
    for kind, p in paths.items():
        mods: dict = {}
        for k, v in load_file(str(p)).items():
            name, suffix = k.split(".", 1)
            mods.setdefault(name, {})[suffix] = v
        out[kind] = mods
    return out


def written(path: Path, name: str) -> torch.Tensor:
    """The dense written ΔW (out, in·k·k) float64 of one module of our output (alpha/rank applied)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        t = {s: f.get_tensor(f"{name}.{s}").double() for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    down = t["lora_down.weight"].flatten(1)
    return t["lora_up.weight"].flatten(1) @ down * (float(t["alpha"]) / down.shape[0])


def compare(groups: dict, modules: dict, stack: list, k: int, ours_path: Path, skip: set,
            max_elements: Optional[int] = None) -> dict:
    """Time the dense approaches on one module per group, extrapolate; errors of all three vs the optimum.
    max_elements (--quick): only groups whose ΔW has at most this many elements (the dense times are then of
    those groups alone, not extrapolated to the model)."""
    if max_elements is not None:
        groups = {g: n for g, n in groups.items() if math.prod(g[0]) <= max_elements}
    rows = {m: {"time_s": 0.0, "err2": 0.0, "worst": 0.0, "peak": 0} for m in ("ours", "dense", "svd_lowrank")}
    opt2 = 0.0
    for (shape, _), names in groups.items():
        name, count = names[0], len(names)
        target = dense_delta(modules, name, stack, torch.float64)
        s = torch.linalg.svdvals(target)
        opt = float((s[k:] ** 2).sum())
        opt2 += count * opt
        for method in ("ours", "dense", "svd_lowrank"):
            if method != "ours" and method in skip:
                continue
            if method == "ours":
                w = written(ours_path, name)
            else:
                release_host_memory()
                with PeakMemory(torch.device("cpu")) as pm:
                    t0 = time.perf_counter()
                    w = truncated(dense_delta(modules, name, stack, torch.float32), k, method).double()
                    rows[method]["time_s"] += count * (time.perf_counter() - t0)
                rows[method]["peak"] = max(rows[method]["peak"], pm.peak_extra)
            err = float(((target - w) ** 2).sum())
            rows[method]["err2"] += count * err
            rows[method]["worst"] = max(rows[method]["worst"], math.sqrt(err / opt) - 1 if opt > 0 else 0.0)
    for r in rows.values():
        r["over_optimum"] = math.sqrt(r["err2"] / opt2) - 1 if opt2 > 0 else 0.0
    return {"rows": rows, "sampled_groups": len(groups), "modules": sum(len(v) for v in groups.values()),
            "partial": max_elements is not None}


# --- runs --------------------------------------------------------------------------------------------

def run_ours(fn, *args, **kwargs) -> tuple:
    """(report, wall seconds, CPU seconds of this process, peak extra RSS bytes)."""
    release_host_memory()
    with PeakMemory(torch.device("cpu")) as pm:
        t0, c0 = time.perf_counter(), time.process_time()
        report = fn(*args, **kwargs)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return report, seconds, cpu, pm.peak_extra


# --quick: the dense approaches only on ΔW of at most this many elements (the 320- and 640-wide modules).
QUICK_MAX_ELEMENTS = 10 ** 6


def bench_sd15(folder: Path, every: int, skip: set) -> dict:
    from lib_lycoris.export import RankMode, export_networks
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Strength
    all_targets = sd15_targets()
    targets = subset(all_targets, every)
    t0 = time.perf_counter()
    paths = write_stack(targets, folder, seed=1)
    made = time.perf_counter() - t0
    out = folder / "sd15_export.safetensors"

    def run():
        nets = [(load_network(paths[k]), Strength(m)) for k, m in SD15_STACK]
        return export_networks(nets, out, RankMode.rank(EXPORT_RANK), device="cpu")
    report, seconds, cpu, peak = run_ours(run)
    scale = len(all_targets) / len(targets)
    methods: dict = {}
    for u in report.units:
        methods[u.method.split()[0]] = methods.get(u.method.split()[0], 0) + 1
    cmp = compare(groups_of(targets, [k for k, _ in SD15_STACK]), read_modules(paths), list(SD15_STACK),
                  EXPORT_RANK, out, skip, QUICK_MAX_ELEMENTS if every > 1 else None)
    return {"modules": len(targets), "modules_full": len(all_targets), "extrapolation": scale,
            "input_mb": sum(p.stat().st_size for p in paths.values()) / MB, "output_mb": out.stat().st_size / MB,
            "ours_s": seconds, "ours_s_full": seconds * scale, "ours_cpu_s_full": cpu * scale, "ours_peak": peak,
            "methods": methods,
            "retained": report.retained, "write_inputs_s": made, "compare": cmp}


def bench_sdxl(folder: Path, every: int, skip: set) -> dict:
    from lib_lycoris.export import RankMode, resize_network
    all_targets = sdxl_targets()
    targets = subset(all_targets, every)
    t0 = time.perf_counter()
    path = write_lora(targets, folder, seed=2)
    made = time.perf_counter() - t0
    out = folder / "sdxl_r32.safetensors"
    report, seconds, cpu, peak = run_ours(resize_network, path, out, RankMode.rank(RESIZE_RANK), device="cpu")
    scale = len(all_targets) / len(targets)
    cmp = compare(groups_of(targets, ["lora"]), read_modules({"lora": path}), [("lora", 1.0)], RESIZE_RANK, out,
                  skip, QUICK_MAX_ELEMENTS if every > 1 else None)
    return {"modules": len(targets), "modules_full": len(all_targets), "extrapolation": scale,
            "input_mb": path.stat().st_size / MB, "output_mb": out.stat().st_size / MB, "ours_s": seconds,
            "ours_s_full": seconds * scale, "ours_cpu_s_full": cpu * scale, "ours_peak": peak,
            "retained": report.retained,
            "write_inputs_s": made, "compare": cmp}


def _pct(x: float) -> str:
    return f"{100 * (0.0 if abs(x) < 5e-6 else x):.3f}"   # float noise around 0 shown as 0.000


def table(title: str, r: dict, goal: float) -> str:
    c = r["compare"]["rows"]
    ext = f" (measured on {r['modules']} of {r['modules_full']} modules, ×{r['extrapolation']:.0f})" \
        if r["extrapolation"] > 1 else ""
    star = "*" if r["extrapolation"] > 1 else ""
    rows = [["ours", f"{r['ours_s_full']:.1f}{star}", f"{r['ours_cpu_s_full']:.1f}{star}", f"{r['ours_peak'] / MB:.0f}",
             _pct(c["ours"]["over_optimum"]), _pct(c["ours"]["worst"])]]
    partial = r["compare"]["partial"]
    for m in ("dense", "svd_lowrank"):
        if c[m]["time_s"] > 0:
            shown = "n/a (--quick)" if partial else f"{c[m]['time_s'] * r['extrapolation']:.1f}*"
            rows.append([m, shown, "-", f"{c[m]['peak'] / MB:.0f}",
                         _pct(c[m]["over_optimum"]), _pct(c[m]["worst"])])
    sample = (f"{r['compare']['sampled_groups']} sampled modules (one per shape group"
              + (", the smaller shapes only: --quick)" if partial else ")"))
    return (f"## {title}{ext}\n\ninputs {r['input_mb']:.0f} MB -> output {r['output_mb']:.1f} MB; goal ≤ {goal:g} s; "
            f"errors on {sample}\n\n"
            + md_table(["approach", "time s", "CPU s", "peak extra MB", "error over optimum %", "worst module %"],
                       rows)
            + "\n\n* extrapolated: Σ over shape groups of (modules × time of the group's sample); ours runs every "
              "module of the file (× the --quick fraction). CPU s: this process's CPU time (on a loaded machine "
              "the wall time is larger). Ours' peak holds the input files and the output, read and written whole.\n")


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a quarter (SD1.5) / an eighth (SDXL) of the modules, "
                                                          "times extrapolated: under a minute")
    ap.add_argument("--skip", default="", help="comma list: dense, svd_lowrank, sd15, sdxl")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 when the load average "
                                                                "exceeds the cores, else torch's own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "export.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)
    info = {"env": env_summary(torch.device("cpu")), "quick": args.quick}
    print(f"# bench/export.py{' --quick' if args.quick else ''}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {info['env'].get('loadavg')}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lycoris-bench-export-") as tmp:
        folder = Path(tmp)
        if "sd15" not in skip:
            results["sd15"] = bench_sd15(folder, 4 if args.quick else 1, skip)
            print(table(f"SD1.5: export LoRA r{LORA_RANK} + LoHa r{LOHA_RANK} + LoKr (factor {LOKR_FACTOR}, "
                        f"r{LOKR_RANK}) -> rank {EXPORT_RANK}", results["sd15"], GOAL_SD15_S), flush=True)
            print(f"paths: {results['sd15']['methods']}; retained energy {results['sd15']['retained']:.4f}\n")
            for f in folder.glob("sd15_*"):
                f.unlink()
        if "sdxl" not in skip:
            results["sdxl"] = bench_sdxl(folder, 8 if args.quick else 1, skip)
            print(table(f"SDXL: resize a rank-{SDXL_RANK} LoRA to rank {RESIZE_RANK}", results["sdxl"], GOAL_SDXL_S),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))
    worst = max((r["compare"]["rows"]["ours"]["worst"] for r in results.values()), default=0.0)
    sd15 = results.get("sd15", {}).get("ours_s_full", float("nan"))
    sdxl = results.get("sdxl", {}).get("ours_s_full", float("nan"))
    print(f"export: SD1.5 3-network export {sd15:.1f} s (goal {GOAL_SD15_S:g} s), SDXL resize {sdxl:.1f} s "
          f"(goal {GOAL_SDXL_S:g} s), worst error {100 * worst:.3f} % over optimum (goal {100 * GOAL_ERROR:g} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
