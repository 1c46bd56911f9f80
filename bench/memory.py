"""Peak host memory of a long-running WebUI's worst cases (#14): 30 networks stacked, and a 2 GB full diff.

    python bench/memory.py            # SD1.5-size UNet in fp16 (1.7 GB), CPU
    python bench/memory.py --quick    # the 1/8-width UNet

Each scenario runs in a fresh subprocess (so one's heap does not hide the next one's peak) and goes the way a
host goes: `Runtime.activate` (resolve, read through the parsed-network cache, bind, apply) then `restore`,
twice (the second generation reads from the cache). Reported: the peak RSS above the process with the model
loaded (VmHWM, reset before the region), against the bound the design promises:

    cache budget (parsed networks kept)  +  backups of the touched weights  +  scratch (2 × the largest
    touched weight in float32)  +  the LoRA factors in float32 the Patcher caches per weight

and what is held after `restore` (kept backups, the cache); `unexplained` = peak − (networks actually held +
backups + scratch + float32 factors): transients (file reads, concatenated factors) and allocator slack.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MB = 1e6


def _build(quick: bool):
    from patcher import QUICK, SD15, build_unet, kohya_targets
    unet = build_unet(QUICK if quick else SD15, torch.device("cpu"), torch.float16, seed=0)
    return unet, kohya_targets(unet)


def _write_loras(targets: list, folder: Path, count: int) -> list:
    from safetensors.torch import save_file
    paths = []
    for n in range(count):
        gen = torch.Generator().manual_seed(100 + n)
        sd = {}
        for path, mod in targets:
            key = "lora_unet_" + path.replace(".", "_")
            w = mod.weight
            kk = tuple(w.shape[2:])
            fan = w.shape[1] * (kk[0] * kk[1] if kk else 1)
            sd[f"{key}.lora_down.weight"] = (torch.randn(16, w.shape[1], *kk, generator=gen) / math.sqrt(fan)).half()
            sd[f"{key}.lora_up.weight"] = (torch.randn(w.shape[0], 16, *((1, 1) if kk else ()), generator=gen) * 1e-3).half()
            sd[f"{key}.alpha"] = torch.tensor(8.0).half()
        p = folder / f"lora{n:02d}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths


def _write_full(targets: list, folder: Path) -> Path:
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for path, mod in targets:
        sd["lora_unet_" + path.replace(".", "_") + ".diff"] = (torch.randn(mod.weight.shape, generator=gen) * 1e-3).half()
    p = folder / "fulldiff.safetensors"
    save_file(sd, str(p))
    return p


def scenario(kind: str, quick: bool, folder: str, budget_mb: int) -> dict:
    """Runs in the child: build the model, then activate/restore twice under PeakMemory."""
    from common import PeakMemory, release_host_memory
    from lib_lycoris.patcher import Patcher
    from lib_lycoris.runtime import Runtime
    unet, targets = _build(quick)
    release_host_memory()
    rt = Runtime([folder], cache_bytes=budget_mb << 20)
    patcher = Patcher(unet)
    names = [p.stem for p in sorted(Path(folder).glob("lora*.safetensors"))] if kind == "stack30" else ["fulldiff"]
    prompt = " ".join(f"<lora:{n}:0.05>" for n in names)
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(2):
            act = rt.activate(patcher, prompt, steps=1)
            assert not act.warnings, act.warnings
            patcher.restore()
    touched = {t.weight for b in patcher._bindings.values() for t, _ in b.pairs}
    params = dict(unet.named_parameters())
    backups = sum(params[w].numel() * params[w].element_size() for w in touched)
    scratch = 2 * max(params[w].numel() for w in touched) * 4
    factors = sum(sum(t.numel() for t in m.adapter.tensors().values()) * 4 for net in rt.cache._items.values()
                  for m in net.modules.values()) if kind == "stack30" else 0
    net_bytes = sum(n.nbytes() for n in rt.cache._items.values())
    file_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.stem in names)
    bound = (budget_mb << 20) + backups + scratch + factors
    return {"scenario": kind, "networks": len(names), "files_MB": file_bytes / MB, "cache_budget_MB": (budget_mb << 20) / MB,
            "cache_held_MB": net_bytes / MB, "backups_MB": backups / MB, "scratch_MB": scratch / MB,
            "factors_f32_MB": factors / MB, "bound_MB": bound / MB, "peak_extra_MB": mem.peak_extra / MB,
            "held_after_MB": mem.held_extra / MB,
            "unexplained_MB": (mem.peak_extra - net_bytes - backups - scratch - factors) / MB,
            "within_bound": mem.peak_extra <= bound}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-mb", type=int, default=2048, help="parsed-network cache budget (the WebUI default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(scenario(args.child, args.quick, args.folder, args.budget_mb)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _, targets = _build(args.quick)
        _write_loras(targets, Path(tmp), 30)
        _write_full(targets, Path(tmp))
        del targets
        rows = []
        for kind in ("stack30", "fulldiff"):
            cmd = [sys.executable, __file__, "--child", kind, "--folder", tmp, "--budget-mb", str(args.budget_mb)]
            out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print(json.dumps(rows))
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
