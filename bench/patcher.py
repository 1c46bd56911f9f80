"""Benchmark of the weight patcher (`lib_lycoris.patcher.Patcher`) against the peers, in one process (#4).

    python bench/patcher.py            # SD1.5-size UNet (fp32 on CPU, fp16 on CUDA)
    python bench/patcher.py --quick    # small UNet, under a minute on CPU
    python bench/patcher.py --tiny     # 1/40 channels: compute ~0, what is left is the per-module fixed cost
    python bench/patcher.py --model sdxl   # SDXL-size UNet (needs a GPU: 10 GB of fp32 weights + backups)

What it builds: a diffusers `UNet2DConditionModel` with the SD1.5 (or SDXL) config, made on the meta
device and materialised with seeded random weights; three kohya-format fp16 networks written as
safetensors files on every Linear/Conv2d inside Transformer2D / ResnetBlock2D / Down- / Upsample2D (the
kohya target set: 278 modules, 99.7 % of the SD1.5 UNet's weights):
  * LoRA/LoCon rank 16, alpha 8;
  * LoHa rank 8 (same parameter count as the LoRA), alpha = rank;
  * LoKr: w1 full 2×2 (factor 2), w2 = w2_a @ w2_b of rank 32 (again the LoRA's parameter count), alpha = rank.
(alpha = rank for LoHa/LoKr keeps the official `lycoris` merge correct: its merge path applies alpha/r twice,
research lycoris_formats.md §7 quirk 1.)

Approaches, each timed as a median over repetitions after an untimed warm-up repetition (which also
counts bytes and FLOPs with `common.OpCounter`):
  * ours: `Patcher(unet).apply / apply (same set) / apply (one strength changed) / set_step / restore`;
    "first apply" is what every generation with tags costs in a host (one Patcher per loaded model, the
    hosts restore after each image, so the set is applied anew, with the backups kept from the last time);
    "first apply (cold)" is a new Patcher (the first LoRA after start: the backups are allocated);
  * lycoris: `lycoris.kohya.create_network_from_weights` + `LycorisNetwork.merge_to(m)` (strength change
    = `merge_to(Δm)`, restore = `merge_to(−m)`: LyCORIS has no backup, so both are incremental);
  * diffusers/PEFT (LoRA only; diffusers rejects LoHa/LoKr files): `lora_state_dict` + `load_lora_into_unet`,
    `fuse_lora` / `unfuse_lora` (strength change = unfuse, `set_scale`, fuse);
  * restore-and-recompute, implemented here from the description of A1111's built-in Lora extension and
    sd-webui-loractl (research a1111_forge.md §b.4): per layer, on any change of the (name, multiplier)
    tuple, copy the weight back from a CPU backup, compute ΔW = up@down (LoHa: (w1a@w1b)*(w2a@w2b), LoKr:
    kron) in the weight dtype, `*= scale`, `* multiplier`, `W.copy_((W + ΔW).to(W.dtype))`, per network;
    A1111 keeps the backups on the modules for the life of the model, so its "first apply" (a new set)
    is restore-from-backup + recompute, and "first apply (cold)" also allocates the backups;
  * candidate: what the fused single-pass update costs for every type (LoRA `addmm(backup, up, down,
    out=W)`, LoHa `addcmul(backup, w1, w2, value=m·s, out=W)`, LoKr `add(backup, kron, alpha=m·s, out=W)`),
    with factors cached on the device: a prototype of the changes suggested for the patcher.
Bypass mode: UNet forward (64×64 latent, batch 2, 77-token context) plain, with ours in bypass mode
(forward hooks) and with diffusers/PEFT unfused layers (its bypass).
Machine limits: copy and read-modify-write bandwidth and GEMM rate in the weight dtype; each row shows
achieved GB/s (counted traffic / median time), passes over the touched weights, GFLOP/s and the fraction of
the bound max(2 passes / copy bandwidth, FLOPs / GEMM rate) it reaches.
Rounding: ours recomputes every weight from its backup, so it has no incremental drift; the bench
checks that after many strength switches in fp16 and bf16 (bit-identical to one fresh apply) and shows the
drift of the incremental W += Δs·ΔW alternative next to it.

Output: a Markdown report on stdout, JSON in bench/out/patcher.json, and a last line
`speedup: first apply Ax vs lycoris merge, Bx vs restore-and-recompute; strength change Cx vs restore-and-recompute`
(LoRA, medians).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from common import (GB, OpCounter, PeakMemory, Samples, Timer, env_summary, fmt_ms, fmt_num,  # noqa: E402
                    machine_limits, md_table, release_host_memory, sync)

log = logging.getLogger("bench")

# --- model configs ----------------------------------------------------------------------------------

# SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape the weights).
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
# SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
# --quick: the SD1.5 topology (same 278 modules, same key names) with 1/8 of the channels.
QUICK = dict(SD15, block_out_channels=(32, 64, 128, 128), cross_attention_dim=256)
# --tiny: the same 278 modules with 1/40 of the channels: each module's GEMM and copy take ~1 µs, so the
# times are the per-module fixed cost (Python, op dispatch) that a GPU run would also pay.
TINY = dict(SD15, block_out_channels=(8, 16, 32, 32), cross_attention_dim=64, norm_num_groups=8)

# kohya's UNet target set (sd-scripts networks/lora.py UNET_TARGET_REPLACE_MODULE + conv ones).
KOHYA_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")

LORA_RANK, LORA_ALPHA = 16, 8.0
LOHA_RANK = 8          # LoHa stores 2 pairs: rank 8 = the rank-16 LoRA's parameter count
LOKR_FACTOR, LOKR_RANK = 2, 32   # w1 (2, 2), w2 = (out/2, 32) @ (32, in/2·k·k): the LoRA's parameter count
STRENGTH_A, STRENGTH_B = 1.0, 0.7
SCHEDULE_TAG = "<lora:{name}:0.5@1,1@2>"   # step 1 of 2: 0.5, step 2: 1.0 (a loractl-style switch)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """diffusers UNet on 'meta', materialised on `device` with seeded N(0, 1/fan_in) weights (norms 1, biases 0)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for b in unet.buffers():
            b.zero_()
    return unet


def kohya_targets(unet) -> list:
    """[(diffusers module path, module)] of every Linear/Conv2d inside the kohya target blocks."""
    seen, out = set(), []
    for name, mod in unet.named_modules():
        if type(mod).__name__ not in KOHYA_BLOCKS:
            continue
        for child, sub in mod.named_modules():
            full = f"{name}.{child}" if child else name
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and full not in seen:
                seen.add(full)
                out.append((full, sub))
    return out


# --- networks -------------------------------------------------------------------------------------

def _randn(gen: torch.Generator, *shape, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).half()


def write_networks(targets: list, folder: Path, seed: int) -> dict:
    """Writes lora/loha/lokr kohya safetensors files; returns {kind: path}. ΔW ≈ 1e-3·‖W‖ per element."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    lora, loha, lokr = {}, {}, {}
    for path, mod in targets:
        key = "lora_unet_" + path.replace(".", "_")
        w = mod.weight
        out_f, in_f = w.shape[0], w.shape[1]
        kk = tuple(w.shape[2:])
        fan = in_f * (kk[0] * kk[1] if kk else 1)
        # LoRA / LoCon: down (r, in[, k, k]), up (out, r[, 1, 1])
        lora[f"{key}.lora_down.weight"] = _randn(gen, LORA_RANK, in_f, *kk, std=1 / math.sqrt(fan))
        lora[f"{key}.lora_up.weight"] = _randn(gen, out_f, LORA_RANK, *((1, 1) if kk else ()), std=2e-3)
        lora[f"{key}.alpha"] = torch.tensor(LORA_ALPHA).half()
        # LoHa: w*_a (out, r), w*_b (r, in·k·k)
        for i in (1, 2):
            loha[f"{key}.hada_w{i}_a"] = _randn(gen, out_f, LOHA_RANK, std=0.1)
            loha[f"{key}.hada_w{i}_b"] = _randn(gen, LOHA_RANK, fan, std=0.1 / math.sqrt(fan))
        loha[f"{key}.alpha"] = torch.tensor(float(LOHA_RANK)).half()
        # LoKr: w1 (a, c), w2_a (b, r), w2_b (r, d·k·k); out = a·b, in = c·d
        a = c = LOKR_FACTOR
        b, d = out_f // a, in_f // c
        lokr[f"{key}.lokr_w1"] = _randn(gen, a, c, std=1.0)
        if LOKR_RANK < max(b, d) / 2:   # LyCORIS decomposes w2 only then (else its loader expects a full w2)
            lokr[f"{key}.lokr_w2_a"] = _randn(gen, b, LOKR_RANK, std=0.05)
            lokr[f"{key}.lokr_w2_b"] = _randn(gen, LOKR_RANK, d * (kk[0] * kk[1] if kk else 1),
                                              std=0.05 / math.sqrt(fan))
        else:
            lokr[f"{key}.lokr_w2"] = _randn(gen, b, d, *kk, std=0.05 * math.sqrt(LOKR_RANK / fan))
        lokr[f"{key}.alpha"] = torch.tensor(float(LOKR_RANK)).half()
    meta = {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"}
    paths = {}
    for kind, sd in (("lora", lora), ("loha", loha), ("lokr", lokr)):
        p = folder / f"bench_{kind}.safetensors"
        save_file(sd, str(p), metadata=meta)
        paths[kind] = p
    return paths


class Factors:
    """One network's factors per layer, on the compute device, for the in-bench approaches."""

    def __init__(self, kind: str, path: Path, targets: list, device: torch.device, dtype: torch.dtype) -> None:
        from safetensors.torch import load_file
        sd = load_file(str(path))
        self.kind, self.name = kind, path.stem
        self.layers = {}
        for tpath, mod in targets:
            key = "lora_unet_" + tpath.replace(".", "_")
            g = {k.split(".", 1)[1]: v.to(device=device, dtype=dtype) for k, v in sd.items()
                 if k.split(".", 1)[0] == key}
            if not g:
                continue
            alpha = float(g.pop("alpha"))
            if kind == "lora":
                rank = g["lora_down.weight"].shape[0]
            elif kind == "loha":
                rank = g["hada_w1_b"].shape[0]
            else:
                rank = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else alpha   # no factor pair: scale 1
            self.layers[tpath] = (g, alpha / rank)

    def updown(self, tpath: str, shape: tuple) -> torch.Tensor:
        """ΔW (unscaled) in the factors' dtype, the A1111 way (a new full-size tensor)."""
        g, _ = self.layers[tpath]
        if self.kind == "lora":
            up, down = g["lora_up.weight"], g["lora_down.weight"]
            return (up.flatten(1) @ down.flatten(1)).reshape(shape)
        if self.kind == "loha":
            return ((g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])).reshape(shape)
        return self.kron(g).reshape(shape)

    @staticmethod
    def kron(g: dict) -> torch.Tensor:
        """kron(w1, w2): w2 = w2_a @ w2_b (b, d·k·k) or the full w2 (b, d[, k, k]); w1 (a, c) unsqueezed to w2."""
        w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
        w1 = g["lokr_w1"].reshape(*g["lokr_w1"].shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2)


# --- the approaches ---------------------------------------------------------------------------------

class RestoreRecompute:
    """A1111 built-in Lora / loractl, from its description: full restore from a CPU backup + recompute."""

    def __init__(self, layers: dict) -> None:
        self.layers = layers            # path -> module
        self.backup: dict = {}
        self.current: dict = {}

    @torch.no_grad()
    def apply(self, items: list) -> int:
        """items: [(Factors, multiplier)]; returns layers rewritten."""
        wanted = tuple((f.name, m) for f, m in items)
        touched = set()
        for f, _ in items:
            touched.update(f.layers)
        touched.update(self.backup)
        n = 0
        for path in touched:
            if self.current.get(path, ()) == wanted:
                continue
            w = self.layers[path].weight
            if path not in self.backup and wanted:
                self.backup[path] = w.detach().to("cpu", copy=True)
            if path in self.backup:
                w.copy_(self.backup[path])                      # restore (H2D on a GPU)
            for f, m in items:
                if path not in f.layers:
                    continue
                updown = f.updown(path, tuple(w.shape))
                updown *= f.layers[path][1]                     # finalize_updown: *= calc_scale()
                updown = updown * m                              # ... * multiplier()
                w.copy_((w.to(updown.dtype) + updown).to(w.dtype))
            self.current[path] = wanted
            n += 1
        return n

    def restore(self) -> int:
        n = self.apply([])
        self.backup.clear()
        self.current.clear()
        return n

    def extra_memory(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.backup.values())


class FusedCandidate:
    """Prototype of the suggested patcher write: one fused op per type from a device backup, factors cached."""

    def __init__(self, layers: dict) -> None:
        self.layers = layers
        self.backup: dict = {}

    @torch.no_grad()
    def apply(self, items: list) -> None:
        touched = set()
        for f, _ in items:
            touched.update(f.layers)
        for path in touched:
            w = self.layers[path].weight
            if path not in self.backup:
                self.backup[path] = w.detach().clone()
            base = self.backup[path]
            w2 = w.view(w.shape[0], -1)
            b2 = base.view(base.shape[0], -1)
            first = True
            for f, m in items:
                if path not in f.layers:
                    continue
                g, s = f.layers[path]
                src = b2 if first else w2
                if f.kind == "lora":
                    up, down = g["lora_up.weight"].flatten(1), g["lora_down.weight"].flatten(1)
                    torch.addmm(src, up, down, alpha=m * s, out=w2)
                elif f.kind == "loha":
                    torch.addcmul(src, g["hada_w1_a"] @ g["hada_w1_b"], g["hada_w2_a"] @ g["hada_w2_b"],
                                  value=m * s, out=w2)
                else:
                    k = Factors.kron(g).reshape(w2.shape)
                    torch.add(src, k, alpha=m * s, out=w2)
                first = False

    def restore(self) -> None:
        with torch.no_grad():
            for path, b in self.backup.items():
                self.layers[path].weight.copy_(b)
        self.backup.clear()


# --- measurement plumbing ---------------------------------------------------------------------------

class Row:
    """One (approach, network set, operation) measurement."""

    def __init__(self, approach: str, netset: str, op: str) -> None:
        self.approach, self.netset, self.op = approach, netset, op
        self.samples = Samples()
        self.count: Optional[dict] = None
        self.peak_extra: Optional[int] = None
        self.held_extra: Optional[int] = None
        self.note = ""

    def to_dict(self) -> dict:
        return {"approach": self.approach, "netset": self.netset, "op": self.op, **self.samples.to_dict(),
                "count": self.count, "peak_extra_bytes": self.peak_extra, "held_extra_bytes": self.held_extra,
                "note": self.note}


class Bench:
    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.reps = reps
        self.timer = Timer(device)
        self.rows: dict = {}
        self.extra: dict = {}

    def row(self, approach: str, netset: str, op: str) -> Row:
        k = (approach, netset, op)
        if k not in self.rows:
            self.rows[k] = Row(approach, netset, op)
        return self.rows[k]

    @contextlib.contextmanager
    def measure(self, approach: str, netset: str, op: str, counting: bool, timed: bool = True):
        """counting: run under OpCounter (the warm-up repetition); timed: add the time to the row."""
        r = self.row(approach, netset, op)
        if counting:
            c = OpCounter()
            with c:
                yield
            r.count = c.to_dict()
            return
        if timed:
            with self.timer(r.samples):
                yield
        else:
            yield

    def get(self, approach: str, netset: str, op: str) -> Optional[Row]:
        return self.rows.get((approach, netset, op))


def fingerprint(params: list) -> list:
    """Bit pattern sums per tensor: equal lists = bit-identical weights (for all practical purposes)."""
    out = []
    with torch.no_grad():
        for p in params:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
            v = p.detach().reshape(-1).view(bits).to(torch.int64)
            out.append((int(v.sum()), int((v * (torch.arange(v.numel(), device=v.device) % 9973 + 1)).sum())))
    return out


# --- sections -----------------------------------------------------------------------------------------

def bench_cold_apply(B: Bench, approach: str, netset: str, make: Callable, items: list) -> None:
    """The first LoRA after start: per repetition a new instance (`make()`), whose backups are allocated."""
    for rep in range(B.reps + 1):
        counting = rep == 0
        obj = make()
        mem = PeakMemory(B.device) if rep == 1 else contextlib.nullcontext()
        with mem:
            with B.measure(approach, netset, "first apply (cold)", counting):
                obj.apply(items)
        if rep == 1:
            r = B.row(approach, netset, "first apply (cold)")
            r.peak_extra, r.held_extra = mem.peak_extra, obj.extra_memory()
        obj.restore()
        del obj
        release_host_memory()


def bench_ours(B: Bench, unet, nets: dict, netset: str, kinds: list, snap_layers: list, snaps: dict) -> None:
    from lib_lycoris.patcher import Patcher, Strength
    from lib_lycoris.tags import parse_tag
    first = nets[kinds[0]]
    sched = parse_tag(SCHEDULE_TAG.format(name=first.name))
    rest = [(nets[k], Strength(1.0)) for k in kinds[1:]]
    items_a = [(first, Strength(STRENGTH_A))] + rest
    items_b = [(first, Strength(STRENGTH_B))] + rest
    items_s = [(first, sched)] + rest
    named = dict(unet.named_parameters())
    params = list(named.values())
    fp0 = fingerprint(params) if netset == "lora" else None
    bench_cold_apply(B, "ours", netset, lambda: Patcher.from_components({"unet": unet}), items_a)
    p = Patcher.from_components({"unet": unet})    # one per loaded model, as the hosts keep it
    for rep in range(B.reps + 1):
        counting = rep == 0
        # per generation: the hosts restore after each image, so the next image's set is applied anew
        with B.measure("ours", netset, "first apply", counting):
            p.apply(items_a)
        if rep == 1:
            B.row("ours", netset, "first apply").held_extra = p.extra_memory()
        if counting:
            snaps[("ours", netset)] = {n: named[n].detach().clone() for n in snap_layers}
        with B.measure("ours", netset, "re-apply same set", counting):
            n_same = p.apply(items_a).slots_written
        for items in (items_b, items_a):
            with B.measure("ours", netset, "strength change (1 network)", counting):
                p.apply(items)
            if counting:
                break
        p.apply(items_s, step=1, total=2)
        for step in (2, 1):
            with B.measure("ours", netset, "schedule step switch", counting):
                p.set_step(step, 2)
            if counting:
                break
        with B.measure("ours", netset, "restore", counting):
            p.restore()
        # the hosts' default (lycoris_keep_applied): park after the image, the next image's apply checks first
        p.apply(items_a)
        p.park()
        with B.measure("ours", netset, "next image, same set (parked)", counting):
            n_parked = p.apply(items_a).slots_written
        for items in (items_b, items_a):
            p.park()
            with B.measure("ours", netset, "next image, strength change (parked)", counting):
                p.apply(items)
            if counting:
                break
        p.restore()
    B.row("ours", netset, "first apply").note = "after restore (kept backups, in-place GEMM)"
    B.row("ours", netset, "next image, same set (parked)").note = f"{n_parked} weights written; verify included"
    del p
    B.row("ours", netset, "re-apply same set").note = f"{n_same} weights written"
    if fp0 is not None:
        B.extra["ours_restore_bit_exact"] = fingerprint(params) == fp0
    release_host_memory()


def bench_restore_recompute(B: Bench, layers: dict, facs: dict, netset: str, kinds: list,
                            snap_layers: list, snaps: dict, named: dict) -> None:
    items_a = [(facs[k], STRENGTH_A if i == 0 else 1.0) for i, k in enumerate(kinds)]
    items_b = [(facs[k], STRENGTH_B if i == 0 else 1.0) for i, k in enumerate(kinds)]
    # loractl: a per-step switch is a new multiplier tuple = the same full restore + recompute
    sched = [(facs[k], 0.5 if i == 0 else 1.0) for i, k in enumerate(kinds)]
    bench_cold_apply(B, "restore-and-recompute", netset, lambda: RestoreRecompute(layers), items_a)
    a = RestoreRecompute(layers)        # A1111 keeps the backups on the modules between generations
    a.apply(items_a)
    a.apply([])
    for rep in range(B.reps + 1):
        counting = rep == 0
        with B.measure("restore-and-recompute", netset, "first apply", counting):
            a.apply(items_a)
        if counting:
            snaps[("restore-and-recompute", netset)] = {n: named[n].detach().clone() for n in snap_layers}
        with B.measure("restore-and-recompute", netset, "re-apply same set", counting):
            a.apply(items_a)
        for items in (items_b, items_a):
            with B.measure("restore-and-recompute", netset, "strength change (1 network)", counting):
                a.apply(items)
            if counting:
                break
        for items in (sched, items_a):
            with B.measure("restore-and-recompute", netset, "schedule step switch", counting):
                a.apply(items)
            if counting:
                break
        with B.measure("restore-and-recompute", netset, "restore", counting):
            a.apply([])
    B.row("restore-and-recompute", netset, "first apply").note = "after restore (kept backups)"
    a.restore()
    del a
    release_host_memory()


def bench_candidate(B: Bench, layers: dict, facs: dict, netset: str, kinds: list) -> None:
    items_a = [(facs[k], STRENGTH_A if i == 0 else 1.0) for i, k in enumerate(kinds)]
    items_b = [(facs[k], STRENGTH_B if i == 0 else 1.0) for i, k in enumerate(kinds)]
    c = FusedCandidate(layers)
    c.apply(items_a)   # backups made (not timed: the same cost as ours)
    for rep in range(B.reps + 1):
        counting = rep == 0
        for items in (items_b, items_a):
            with B.measure("candidate (fused, bench prototype)", netset, "strength change (1 network)", counting):
                c.apply(items)
            if counting:
                break
    c.restore()
    del c
    release_host_memory()


def bench_lycoris(B: Bench, unet, paths: dict, kind: str, snap_layers: list, snaps: dict, named: dict,
                  originals: dict) -> None:
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.wrapper import LycorisNetwork
    from safetensors.torch import load_file
    saved = {k: getattr(LycorisNetworkKohya, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME")}
    # quirk 2 (research lycoris_formats.md §7): TimestepEmbedding in the default list collides with
    # time_embedding.linear_* names on a diffusers UNet; quirk 3: presets are class attributes, so restore them.
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = list(KOHYA_BLOCKS)
    LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        sd = load_file(str(paths[kind]))
        with B.measure("lycoris", kind, "load (create_network_from_weights)", False):
            net, _ = create_network_from_weights(1.0, str(paths[kind]), None, None, unet, weights_sd=sd)
            net.loras = net.text_encoder_loras + net.unet_loras
        for rep in range(B.reps + 1):
            counting = rep == 0
            mem = PeakMemory(B.device) if rep == 1 else contextlib.nullcontext()
            with mem:
                with B.measure("lycoris", kind, "first apply", counting):
                    LycorisNetwork.merge_to(net, STRENGTH_A)
            if rep == 1:
                r = B.row("lycoris", kind, "first apply")
                r.peak_extra, r.held_extra = mem.peak_extra, 0
                r.note = f"{len(net.loras)} modules"
            if counting:
                snaps[("lycoris", kind)] = {n: named[n].detach().clone() for n in snap_layers}
            with B.measure("lycoris", kind, "strength change (1 network)", counting):
                LycorisNetwork.merge_to(net, STRENGTH_B - STRENGTH_A)
            with B.measure("lycoris", kind, "restore", counting):
                LycorisNetwork.merge_to(net, -STRENGTH_B)
        del net
        drift = max(float((named[n].detach().float() - originals[n].float()).abs().max()) for n in snap_layers)
        B.extra[f"lycoris_{kind}_restore_maxabs"] = drift
        with torch.no_grad():   # undo the drift so later sections start from the original weights
            for n in snap_layers:
                named[n].copy_(originals[n])
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)
    B.row("lycoris", kind, "strength change (1 network)").note = "incremental merge_to(Δm)"
    B.row("lycoris", kind, "restore").note = "merge_to(−m): not exact"
    release_host_memory()


def unet_inputs(config: dict, device: torch.device, dtype: torch.dtype, batch: int = 2, size: int = 64) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(7)
    kw = dict(sample=torch.randn(batch, 4, size, size, generator=gen),
              timestep=torch.tensor(500.0),
              encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=gen))
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 1280, generator=gen),
                                       time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch))
    return {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
                else {kk: vv.to(device=device, dtype=dtype) for kk, vv in v.items()}) for k, v in kw.items()}


def bench_bypass(B: Bench, unet, nets: dict, inputs: dict, fwd_reps: int) -> None:
    from lib_lycoris.patcher import Patcher, Strength

    def fwd():
        with torch.no_grad():
            unet(**inputs)

    fwd()   # warm-up
    sync(B.device)
    p = Patcher.from_components({"unet": unet})
    for rep in range(fwd_reps):
        with B.timer(B.row("forward", "-", "UNet forward, plain").samples):
            fwd()
        p.apply([(nets["lora"], Strength(1.0), "bypass")])
        with B.timer(B.row("forward", "lora", "UNet forward, ours bypass").samples):
            fwd()
        p.restore()
    release_host_memory()


def bench_peft(B: Bench, unet, paths: dict, snap_layers: list, snaps: dict, named: dict, originals: dict,
               inputs: Optional[dict], fwd_reps: int) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as M
    from peft.tuners.tuners_utils import BaseTunerLayer
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    r = B.row("diffusers/peft", "lora", "load (lora_state_dict + load_lora_into_unet)")
    with B.timer(r.samples):
        sd, alphas = M.lora_state_dict(str(paths["lora"]))
        M.load_lora_into_unet(sd, alphas, unet, adapter_name="bench")
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    r.note = f"{len(layers)} PEFT layers"

    def set_scale(s: float) -> None:
        for layer in layers:
            layer.set_scale("bench", s)

    if inputs is not None:
        with torch.no_grad():
            unet(**inputs)
        for _ in range(fwd_reps):
            with B.timer(B.row("forward", "lora", "UNet forward, diffusers/peft unfused").samples):
                with torch.no_grad():
                    unet(**inputs)
    for rep in range(B.reps + 1):
        counting = rep == 0
        mem = PeakMemory(B.device) if rep == 1 else contextlib.nullcontext()
        set_scale(STRENGTH_A)
        with mem:
            with B.measure("diffusers/peft", "lora", "first apply", counting):
                unet.fuse_lora()
        if rep == 1:
            rr = B.row("diffusers/peft", "lora", "first apply")
            rr.peak_extra, rr.held_extra = mem.peak_extra, None
        if counting:
            snaps[("diffusers/peft", "lora")] = {n: named[n].detach().clone() for n in snap_layers}
        with B.measure("diffusers/peft", "lora", "strength change (1 network)", counting):
            unet.unfuse_lora()
            set_scale(STRENGTH_B)
            unet.fuse_lora()
        with B.measure("diffusers/peft", "lora", "restore", counting):
            unet.unfuse_lora()
    B.row("diffusers/peft", "lora", "strength change (1 network)").note = "unfuse + set_scale + fuse"
    B.row("diffusers/peft", "lora", "restore").note = "unfuse (recompute and subtract): not exact"
    B.extra["peft_restore_maxabs"] = max(float((named[n].detach().float() - originals[n].float()).abs().max())
                                         for n in snap_layers)
    unet.unload_lora()
    release_host_memory()


def bench_drift(device: torch.device, switches: int, seed: int) -> list:
    """fp16/bf16: ours after `switches` strength changes vs one fresh apply; the incremental W += Δs·ΔW beside."""
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    rows = []
    rng = random.Random(seed)
    strengths = [round(rng.uniform(0.2, 1.2), 3) for _ in range(switches)]
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_unet(QUICK, torch.device("cpu"), torch.float32, seed)
        targets = kohya_targets(ref)
        paths = write_networks(targets, Path(tmp), seed + 1)
        net = load_network(paths["lora"])
        facs = Factors("lora", paths["lora"], targets, device, torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            unet = build_unet(QUICK, device, dtype, seed)
            tmap = dict(kohya_targets(unet))
            orig = {n: m.weight.detach().clone() for n, m in tmap.items()}
            p = Patcher.from_components({"unet": unet})
            for s in strengths:
                p.apply([(net, Strength(s))])
            after = {n: m.weight.detach().clone() for n, m in tmap.items()}
            p.restore()
            exact_restore = all(torch.equal(m.weight, orig[n]) for n, m in tmap.items())
            p = Patcher.from_components({"unet": unet})
            p.apply([(net, Strength(strengths[-1]))])
            fresh = {n: m.weight.detach().clone() for n, m in tmap.items()}
            p.restore()
            ours_diff = max(float((after[n].float() - fresh[n].float()).abs().max()) for n in tmap)
            ours_ne = sum(int((after[n] != fresh[n]).sum()) for n in tmap)
            # incremental alternative: W += (s_new − s_old)·scale·up@down, the update in fp32, rounded once per step
            prev = 0.0
            with torch.no_grad():
                for s in strengths:
                    for n, m in tmap.items():
                        g, sc = facs.layers[n]
                        d = (g["lora_up.weight"].flatten(1) @ g["lora_down.weight"].flatten(1)) * ((s - prev) * sc)
                        m.weight.add_(d.reshape(m.weight.shape).to(dtype))
                    prev = s
            inc = {n: m.weight.detach().clone() for n, m in tmap.items()}
            inc_diff = max(float((inc[n].float() - fresh[n].float()).abs().max()) for n in tmap)
            inc_ne = sum(int((inc[n] != fresh[n]).sum()) for n in tmap)
            total = sum(w.numel() for w in fresh.values())
            # size of one ulp at the typical weight magnitude, for scale
            med = float(torch.cat([w.float().abs().reshape(-1)[:100000] for w in fresh.values()]).median())
            ulp = med * float(torch.finfo(dtype).eps)
            rows.append({"dtype": str(dtype).replace("torch.", ""), "switches": switches,
                         "ours_maxabs_vs_fresh": ours_diff, "ours_elements_differing": ours_ne,
                         "ours_restore_bit_exact": exact_restore,
                         "incremental_maxabs_vs_fresh": inc_diff, "incremental_elements_differing": inc_ne,
                         "incremental_fraction_differing": inc_ne / total, "elements": total,
                         "ulp_at_median_weight": ulp})
            del unet, p
    return rows


# --- report ---------------------------------------------------------------------------------------------

def report(B: Bench, limits: dict, wbytes: dict, info: dict, drift: list) -> tuple:
    copy_bw = limits["copy_GBps_best"] * GB
    gemm = limits["gemm_GFLOPs_best"] * 1e9
    lines = []
    header = ["approach", "networks", "operation", "median ms", "min–max ms", "spread", "passes over W",
              "GB/s", "GFLOP/s", "bound/median", "peak extra MB", "note"]
    rows = []
    order = {"ours": 0, "candidate (fused, bench prototype)": 1, "lycoris": 2, "diffusers/peft": 3,
             "restore-and-recompute": 4}
    ops = ["load (create_network_from_weights)", "load (lora_state_dict + load_lora_into_unet)", "first apply (cold)",
           "first apply",
           "re-apply same set", "strength change (1 network)", "schedule step switch", "restore",
           "next image, same set (parked)", "next image, strength change (parked)"]
    sets = ["lora", "loha", "lokr", "lora+loha+lokr"]
    for (appr, ns, op), r in sorted(B.rows.items(), key=lambda kv: (
            sets.index(kv[0][1]) if kv[0][1] in sets else 9, ops.index(kv[0][2]) if kv[0][2] in ops else 9,
            order.get(kv[0][0], 9))):
        if appr == "forward":
            continue
        med = r.samples.median
        wb = wbytes.get(ns)
        c = r.count or {}
        bytes_ = c.get("read_bytes", 0) + c.get("written_bytes", 0)
        passes = bytes_ / wb if (wb and c) else None
        gbs = bytes_ / med / GB if (c and med == med and med > 0) else None
        gfl = c.get("flops", 0) / med / 1e9 if (c and med == med and med > 0 and c.get("flops")) else None
        bound = None
        if wb and c and "load" not in op and med > 0 and (op != "re-apply same set"):
            bound = max(2 * wb / copy_bw, c.get("flops", 0) / gemm) / med
        rows.append([appr, ns, op, fmt_ms(med), f"{fmt_ms(r.samples.min)}–{fmt_ms(r.samples.max)}",
                     f"{r.samples.spread * 100:.0f}%", fmt_num(passes), fmt_num(gbs), fmt_num(gfl),
                     fmt_num(bound, 2), "-" if r.peak_extra is None else f"{r.peak_extra / 2**20:.0f}",
                     r.note])
    lines.append(md_table(header, rows))
    # forward / bypass
    plain = B.get("forward", "-", "UNet forward, plain")
    fw_rows = []
    overhead = None
    for key in (("forward", "-", "UNet forward, plain"), ("forward", "lora", "UNet forward, ours bypass"),
                ("forward", "lora", "UNet forward, diffusers/peft unfused")):
        r = B.rows.get(key)
        if r is None:
            continue
        ov = (r.samples.median / plain.samples.median - 1) if plain and key[2] != "UNet forward, plain" else None
        if key[2] == "UNet forward, ours bypass":
            overhead = ov
        fw_rows.append([key[2], fmt_ms(r.samples.median), f"{fmt_ms(r.samples.min)}–{fmt_ms(r.samples.max)}",
                        f"{r.samples.spread * 100:.0f}%", "-" if ov is None else f"{ov * 100:+.1f}%"])
    if fw_rows:
        lines.append("")
        lines.append(md_table(["UNet forward (64×64 latent, batch 2, 77-token context)", "median ms", "min–max ms",
                               "spread", "overhead vs plain"], fw_rows))
    if drift:
        lines.append("")
        lines.append(md_table(
            ["dtype", "strength switches", "ours: max |W − fresh apply|", "ours: elements differing",
             "ours: restore bit-exact", "incremental W += Δs·ΔW: max |W − fresh|", "incremental: elements differing",
             "ulp at median |W|"],
            [[d["dtype"], d["switches"], f"{d['ours_maxabs_vs_fresh']:.3g}", d["ours_elements_differing"],
              d["ours_restore_bit_exact"], f"{d['incremental_maxabs_vs_fresh']:.3g}",
              f"{d['incremental_elements_differing']} ({d['incremental_fraction_differing'] * 100:.1f}%)",
              f"{d['ulp_at_median_weight']:.3g}"] for d in drift]))
    return "\n".join(lines), overhead


def speedups(B: Bench) -> dict:
    def med(a, ns, op):
        r = B.get(a, ns, op)
        return r.samples.median if r and r.samples.values else float("nan")
    out = {}
    for ns in ("lora", "loha", "lokr", "lora+loha+lokr"):
        if B.get("ours", ns, "first apply") is None:
            continue
        ours_first = med("ours", ns, "first apply")
        ours_change = med("ours", ns, "strength change (1 network)")
        out[ns] = {
            "first_vs_lycoris": med("lycoris", ns, "first apply") / ours_first,
            "first_vs_rr": med("restore-and-recompute", ns, "first apply") / ours_first,
            "first_vs_peft": med("diffusers/peft", ns, "first apply") / ours_first,
            "cold_vs_lycoris": med("lycoris", ns, "first apply") / med("ours", ns, "first apply (cold)"),
            "cold_vs_rr": med("restore-and-recompute", ns, "first apply (cold)") / med("ours", ns, "first apply (cold)"),
            "change_vs_rr": med("restore-and-recompute", ns, "strength change (1 network)") / ours_change,
            "change_vs_lycoris": med("lycoris", ns, "strength change (1 network)") / ours_change,
            "change_vs_peft": med("diffusers/peft", ns, "strength change (1 network)") / ours_change,
            "step_vs_rr": med("restore-and-recompute", ns, "schedule step switch") / med("ours", ns, "schedule step switch"),
            "restore_vs_rr": med("restore-and-recompute", ns, "restore") / med("ours", ns, "restore"),
        }
    return out


# --- main -----------------------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small UNet (1/8 channels), fewer repetitions")
    ap.add_argument("--tiny", action="store_true", help="1/40 channels (implies --quick): the per-module fixed cost")
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per operation")
    ap.add_argument("--fwd-reps", type=int, default=None, help="timed UNet forwards per variant")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: lycoris,peft,peft-forward,forward,drift,combined")
    ap.add_argument("--kinds", default="lora,loha,lokr", help="network kinds to time (lora is always timed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default on CPU: 1 when the load average exceeds the cores: with other "
                         "jobs on the cores, 2-thread OpenMP barriers stall small ops by 10-100 ms)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "patcher.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lycoris").setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))
    args.quick = args.quick or args.tiny

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)
    config = TINY if args.tiny else QUICK if args.quick else (SDXL if args.model == "sdxl" else SD15)
    reps = args.reps or (3 if args.quick else (5 if device.type == "cuda" else 2))
    fwd_reps = args.fwd_reps or (3 if args.quick or device.type == "cuda" else 2)
    seed = 1234
    t_start = time.perf_counter()
    B = Bench(device, reps)
    info = {"env": env_summary(device), "model": "tiny" if args.tiny else "quick" if args.quick else args.model, "dtype": str(dtype),
            "reps": reps, "fwd_reps": fwd_reps}

    print(f"# bench/patcher.py: {info['model']} UNet, {dtype}, {device}, {reps} timed reps (+1 counted warm-up)",
          flush=True)
    limits = machine_limits(device, dtype, reps=5, copy_bytes=(256 << 20) if args.quick else (1 << 30),
                            gemm_n=2048 if (args.quick or device.type == "cpu") else 8192)
    print(f"machine: copy {limits['copy_GBps']:.1f} GB/s (best {limits['copy_GBps_best']:.1f}), "
          f"in-place RMW {limits['rmw_GBps']:.1f} GB/s, GEMM {limits['gemm_GFLOPs']:.0f} GFLOP/s "
          f"(best {limits['gemm_GFLOPs_best']:.0f}) in {limits['dtype']}", flush=True)

    t0 = time.perf_counter()
    unet = build_unet(config, device, dtype, seed)
    targets = kohya_targets(unet)
    layers = dict(targets)
    named = dict(unet.named_parameters())
    wb_touched = sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
    n_params = sum(p.numel() for p in unet.parameters())
    kinds_n = {"Linear": 0, "Conv 3x3": 0, "Conv 1x1": 0}
    for _, m in targets:
        kinds_n["Linear" if isinstance(m, torch.nn.Linear) else f"Conv {m.kernel_size[0]}x{m.kernel_size[1]}"] += 1
    info.update(params=n_params, modules=len(targets), module_kinds=kinds_n, touched_weight_bytes=wb_touched,
                touched_params=sum(m.weight.numel() for _, m in targets), build_s=time.perf_counter() - t0)
    print(f"UNet: {n_params / 1e6:.1f} M params, {len(targets)} target modules {kinds_n}, "
          f"{wb_touched / GB:.2f} GB of touched weights; built in {info['build_s']:.1f} s", flush=True)

    # snapshot layers for cross-checks: the largest Linear, Conv 3x3 and Conv 1x1
    snap_layers = []
    for pred in (lambda m: isinstance(m, torch.nn.Linear), lambda m: isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3),
                 lambda m: isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)):
        cands = [(m.weight.numel(), n) for n, m in targets if pred(m)]
        if cands:
            snap_layers.append(max(cands)[1] + ".weight")
    originals = {n: named[n].detach().clone() for n in snap_layers}
    snaps: dict = {}

    from lib_lycoris.network import load_network
    tmp = tempfile.TemporaryDirectory()
    paths = write_networks(targets, Path(tmp.name), seed + 1)
    info["network_file_bytes"] = {k: p.stat().st_size for k, p in paths.items()}
    t0 = time.perf_counter()
    nets = {k: load_network(p) for k, p in paths.items()}
    info["ours_load_s"] = time.perf_counter() - t0
    facs = {k: Factors(k, p, targets, device, dtype) for k, p in paths.items()}
    wbytes = {ns: wb_touched for ns in ("lora", "loha", "lokr", "lora+loha+lokr")}
    kinds_on = ["lora"] + [k for k in ("loha", "lokr") if k in args.kinds.split(",")]
    sets = [(k, [k]) for k in kinds_on]
    if "combined" not in skip and len(kinds_on) == 3:
        sets.append(("lora+loha+lokr", ["lora", "loha", "lokr"]))

    def progress(what: str) -> None:
        print(f"  [{time.perf_counter() - t_start:6.0f} s] {what}", flush=True)

    for ns, kinds in sets:
        progress(f"ours {ns}")
        bench_ours(B, unet, nets, ns, kinds, [n for n in snap_layers], snaps)
        progress(f"candidate {ns}")
        bench_candidate(B, layers, facs, ns, kinds)
        progress(f"restore-and-recompute {ns}")
        bench_restore_recompute(B, layers, facs, ns, kinds, snap_layers, snaps, named)
    if "lycoris" not in skip:
        for kind in kinds_on:
            progress(f"lycoris {kind}")
            bench_lycoris(B, unet, paths, kind, snap_layers, snaps, named, originals)
    inputs = None
    if "forward" not in skip:
        progress("UNet forward: plain vs bypass")
        # --quick: 32×32 latent (its 4-dim heads make 64×64 self-attention cost more than the whole small UNet)
        inputs = unet_inputs(config, device, dtype, size=32 if args.quick else 64)
        bench_bypass(B, unet, nets, inputs, fwd_reps)
    if "peft" not in skip:
        progress("diffusers/peft")
        bench_peft(B, unet, paths, snap_layers, snaps, named, originals,
                   None if "peft-forward" in skip else inputs, fwd_reps)
    drift = []
    if "drift" not in skip:
        progress("rounding drift fp16/bf16")
        drift = bench_drift(device, 50 if args.quick else 200, seed)

    # cross-checks: every approach's merged weights against ours (same network, strength 1)
    checks = {}
    for (appr, ns), snap in snaps.items():
        if appr == "ours":
            continue
        ref = snaps.get(("ours", ns))
        if ref:
            checks[f"{appr} vs ours ({ns})"] = max(float((snap[n].float() - ref[n].float()).abs().max()) for n in ref)
    # ours against an independent float64 reference on the snapshot layers (LoRA)
    ref64 = {}
    for n in snap_layers:
        path = n[: -len(".weight")]
        g, s = facs["lora"].layers[path]
        d = (g["lora_up.weight"].double().flatten(1) @ g["lora_down.weight"].double().flatten(1)) * s
        ref64[n] = float((snaps[("ours", "lora")][n].double() - (originals[n].double() + d.reshape(originals[n].shape)))
                         .abs().max())
    checks["ours (lora) vs float64 reference"] = max(ref64.values())
    B.extra["cross_checks_maxabs"] = checks

    table, overhead = report(B, limits, wbytes, info, drift)
    sp = speedups(B)
    print()
    print(f"## Patch operations ({info['model']} UNet, {dtype}, {device}; {len(targets)} modules, "
          f"{wb_touched / GB:.2f} GB touched)")
    print()
    print(f"Machine: copy {limits['copy_GBps']:.1f} GB/s median / {limits['copy_GBps_best']:.1f} best "
          f"(spread {limits['copy_spread'] * 100:.0f}%), in-place RMW {limits['rmw_GBps']:.1f} GB/s, "
          f"{limits['dtype']} GEMM {limits['gemm_GFLOPs']:.0f} GFLOP/s median / {limits['gemm_GFLOPs_best']:.0f} best "
          f"(n={limits['gemm_n']}). Bound per row = max(2 passes over the touched weights at best copy bandwidth, "
          f"counted FLOPs at best GEMM rate). Passes and GB/s from bytes counted per ATen op in the warm-up "
          f"repetition. Spread = (max − min)/median over {reps} reps; load average at start "
          f"{info['env'].get('loadavg', ('?',))[0]}.")
    print()
    print(table)
    print()
    print("Cross-checks (max |ΔW| between approaches on the largest Linear / Conv3x3 / Conv1x1, strength 1): "
          + ", ".join(f"{k}: {v:.3g}" for k, v in checks.items()))
    print(f"Ours restore bit-exact (whole model): {B.extra.get('ours_restore_bit_exact')}; lycoris restore max "
          f"|drift|: " + ", ".join(f"{k.split('_')[1]} {v:.3g}" for k, v in B.extra.items()
                                    if k.startswith("lycoris_")) + f"; peft unfuse max |drift|: "
          f"{B.extra.get('peft_restore_maxabs', float('nan')):.3g}")
    print()
    # targets
    lo = sp["lora"]
    lyc = B.get("lycoris", "lora", "first apply")       # absent with --skip lycoris
    ceiling = lyc.samples.median / (2 * wb_touched / (limits["copy_GBps_best"] * GB)) if lyc else float("nan")
    tg = [
        ["first apply ≥ 8× faster than lycoris merge (LoRA)", f"{lo['first_vs_lycoris']:.1f}×", lo["first_vs_lycoris"] >= 8],
        ["first apply ≥ 4× faster than restore-and-recompute (LoRA)", f"{lo['first_vs_rr']:.1f}×", lo["first_vs_rr"] >= 4],
        ["  (info) first apply (cold, new Patcher) vs lycoris merge / vs r&r (cold)",
         f"{lo['cold_vs_lycoris']:.1f}× / {lo['cold_vs_rr']:.1f}×", None],
        ["  (info) largest ratio vs lycoris merge any in-place apply can reach here (2 passes at best copy BW)",
         f"{ceiling:.1f}×", None],
        ["strength change ≥ 5× faster than restore-and-recompute (LoRA)", f"{lo['change_vs_rr']:.1f}×", lo["change_vs_rr"] >= 5],
        ["bypass overhead < 15% of a forward (LoRA r16)", "-" if overhead is None else f"{overhead * 100:+.1f}%",
         None if overhead is None else overhead < 0.15],
    ]
    first_ms = B.get("ours", "lora", "first apply").samples.median * 1e3
    change_ms = B.get("ours", "lora", "strength change (1 network)").samples.median * 1e3
    if args.quick:   # #15: the per-module cost, where each module's compute is small (as on a GPU)
        tg += [["first apply ≥ 2× faster than restore-and-recompute (--quick)", f"{lo['first_vs_rr']:.1f}×",
                lo["first_vs_rr"] >= 2],
               ["schedule step switch ≥ 3× faster than restore-and-recompute (--quick)", f"{lo['step_vs_rr']:.1f}×",
                lo["step_vs_rr"] >= 3]]
    else:
        tg += [["first apply ≥ 10× faster than restore-and-recompute (full size)", f"{lo['first_vs_rr']:.1f}×",
                lo["first_vs_rr"] >= 10],
               ["strength change ≤ 1.1× the first apply (full size)", f"{change_ms / first_ms:.2f}×",
                change_ms <= 1.1 * first_ms]]
    parked = B.get("ours", "lora", "next image, same set (parked)")
    if parked is not None:
        moved = B.get("ours", "lora", "next image, strength change (parked)").samples.median * 1e3
        tg.append(["  (info) next image parked (hosts' default): same set / strength change, vs first apply",
                   f"{parked.samples.median * 1e3:.2f} ms / {moved:.1f} ms, vs {first_ms:.1f} ms", None])
    for ns in ("loha", "lokr", "lora+loha+lokr"):
        if ns in sp:
            tg.append([f"  (info) {ns}: first vs lycoris / vs r&r; change vs r&r",
                       f"{sp[ns]['first_vs_lycoris']:.1f}× / {sp[ns]['first_vs_rr']:.1f}×; {sp[ns]['change_vs_rr']:.1f}×",
                       None])
    if device.type == "cuda":
        full = B.get("ours", "lora", "strength change (1 network)")
        lim = 2.0 if args.model == "sd15" else 6.0
        ms = full.samples.median * 1e3
        bound_ms = 2 * wb_touched / (limits["copy_GBps_best"] * GB) * 1e3
        tg.append([f"full re-patch ≤ {lim:g} ms and within 2× of bandwidth bound ({bound_ms:.2f} ms)",
                   f"{ms:.2f} ms", (not args.quick) and ms <= lim and ms <= 2 * bound_ms])
    print(md_table(["target", "measured", "met"], [[a, b, "-" if c is None else ("yes" if c else "NO")]
                                                   for a, b, c in tg]))
    info["total_s"] = time.perf_counter() - t_start
    out = {"info": info, "limits": limits, "rows": [r.to_dict() for r in B.rows.values()], "speedups": sp,
           "extra": B.extra, "drift": drift, "targets": [{"target": a, "measured": b, "met": c} for a, b, c in tg],
           "snap_layers": snap_layers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\n(total {info['total_s']:.0f} s; JSON in {args.out})")
    print(f"speedup: first apply {lo['first_vs_lycoris']:.1f}x vs lycoris merge, {lo['first_vs_rr']:.1f}x vs "
          f"restore-and-recompute; strength change {lo['change_vs_rr']:.1f}x vs restore-and-recompute; "
          f"schedule switch {lo['step_vs_rr']:.1f}x vs restore-and-recompute")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
