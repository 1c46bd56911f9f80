"""One generation: CFG sampling over a diffusers scheduler, networks moved by the Patcher at every step.

    session = Session(model, networks_dir)
    result = session.generate(GenParams("a cat <lora:ink:0.8>", steps=4, seed=1))
    result.image, result.infotext, result.warnings, result.weights

Per generation (the WebUI order of things, with the engine's Runtime doing all network work):

1. `Runtime.activate` parses the tags, resolves and loads the networks and applies them at step 1;
   every problem becomes a warning, never an exception.
2. For each te segment (steps with constant text-encoder weights) `patcher.set_step(segment.start)`, then
   the prompt and negative prompt are encoded once; step s uses the conditioning of its segment.
3. Before each UNet call `patcher.set_step(s, steps)`: schedules, start/stop and block weights move.
4. Optional hires pass (upscaled latents, re-noised to `denoise`): its own step count, `hires=True`
   weights (hr, hrte, hrunet), its own te segments.
5. `patcher.restore()` in all cases: the model is bit-identical to before.

The weight plot (`GenResult.series`, `GenResult.weight_rows`) shows what the engine used: every value comes
from `NetworkRequest.weight(component, block, step, total)`. A hold schedule is drawn as steps (the value of
step s lasts until step s+1), a ramp only between steps that `interp=linear` interpolates.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lib_lycoris.blocks import arch_block_ids, coarse_block
from lib_lycoris.patcher import Patcher
from lib_lycoris.runtime import Runtime, te_segments
from lib_lycoris.schedule import LINEAR
from lib_lycoris.tags import NetworkRequest, parse_prompt, step_table

from . import __version__
from .model import Model

log = logging.getLogger("lycoris_app")

# Sampler names as the WebUI shows them -> diffusers scheduler classes (one UNet call per step each).
SAMPLERS = {
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
}
# The VAE's downsampling factor (3 stride-2 levels) for every SD model.
LATENT_FACTOR = 8
MAX_STEPS = 150
MODES = ("merge", "bypass")

Progress = Callable[[int, int, str], None]


@dataclass
class GenParams:
    prompt: str
    negative: str = ""
    steps: int = 4
    seed: int = 1
    cfg: float = 7.0
    width: int = 64
    height: int = 64
    sampler: str = "Euler"
    mode: str = "merge"              # 'merge' writes weights; 'bypass' uses forward hooks
    hires_scale: float = 1.0          # > 1 enables the hires pass
    hires_steps: int = 0              # 0 = same as steps
    denoise: float = 0.5


@dataclass(frozen=True)
class WeightSeries:
    """One line of the weight plot: the engine's multiplier at each step of one pass.

    `ramps[i]` says how step i+1 joins step i+2: True = a straight line (both steps interpolated by an
    `interp=linear` tag), False = hold (the value of step i+1 lasts until step i+2 starts).
    """

    label: str
    values: tuple[float, ...]        # index 0 is step 1 of the pass
    ramps: tuple[bool, ...]          # len(values) - 1 joins
    hires: bool = False

    def points(self, offset: int = 0) -> list[tuple[int, float]]:
        """(x, weight) points, x = offset + step, in x order, such that a line through them is the schedule:
        at a hold edge where the value changes, two points share x (the old value, then the new one), so the
        line is flat until the next step and jumps there. Points inside a flat run are left out (the line is
        the same): Gradio's plot thins out a series of 1000+ rows by x buckets, which would bend the edges."""
        if not self.values:
            return []
        out = [(offset + 1, self.values[0])]
        for i in range(1, len(self.values)):
            x, before, now = offset + i + 1, self.values[i - 1], self.values[i]
            if now != before and not self.ramps[i - 1]:
                out.append((x, before))      # the step before lasts up to here, then a vertical jump
            out.append((x, now))
        return [pt for i, pt in enumerate(out)
                if i in (0, len(out) - 1) or not out[i - 1][1] == pt[1] == out[i + 1][1]]


@dataclass
class GenResult:
    image: Image.Image
    infotext: str
    warnings: list
    weights: dict = field(default_factory=dict)          # name -> step_table: {'te': [...], 'unet': [...], ...}
    hires_weights: dict = field(default_factory=dict)
    seconds: float = 0.0
    series: list = field(default_factory=list)           # WeightSeries of both passes, for the plot

    def weight_rows(self) -> list:
        """(step, weight, series) rows for a line plot; hires steps continue after the first pass.

        Rows of one series are in x order; at a hold edge two rows share x (the old value, then the new one).
        """
        offset = max((len(s.values) for s in self.series if not s.hires), default=0)
        return [(x, v, s.label) for s in self.series for x, v in s.points(offset if s.hires else 0)]

    def png_bytes(self) -> bytes:
        import io
        buf = io.BytesIO()
        save_png(self.image, self.infotext, buf)
        return buf.getvalue()


def save_png(image: Image.Image, infotext: str, target) -> None:
    """PNG with the infotext in the `parameters` text chunk, as the WebUI writes it."""
    info = PngInfo()
    info.add_text("parameters", infotext)
    image.save(target, format="PNG", pnginfo=info)


def _scheduler(model: Model, sampler: str):
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; one of {', '.join(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(model.scheduler_config)


def _quote(value: str) -> str:
    """WebUI infotext quoting for values with ',', ':' or '"' (modules/infotext_utils.quote)."""
    if "," not in value and "\n" not in value and ":" not in value and '"' not in value:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def infotext(p: GenParams, model: Model, hashes: list, extra: Optional[dict] = None) -> str:
    """The WebUI infotext: prompt, `Negative prompt:`, then `key: value` pairs incl. `Lora hashes`."""
    fields = {"Steps": p.steps, "Sampler": p.sampler, "CFG scale": f"{p.cfg:g}", "Seed": p.seed,
              "Size": f"{p.width}x{p.height}", "Model hash": model.short_hash, "Model": model.name}
    if p.hires_scale > 1:
        fields.update({"Denoising strength": f"{p.denoise:g}", "Hires upscale": f"{p.hires_scale:g}",
                       "Hires steps": p.hires_steps or p.steps})
    if p.mode != "merge":
        fields["Lora mode"] = p.mode
    if hashes:
        fields["Lora hashes"] = _quote(", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes))
    fields.update(extra or {})
    fields["Version"] = f"lycoris_app {__version__}"
    lines = [p.prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


class Session:
    """A loaded model, its Patcher and the network Runtime: what a host process keeps between images."""

    def __init__(self, model: Model, network_dirs: list) -> None:
        self.model = model
        self.patcher = Patcher(model.patch_root())
        self.runtime = Runtime([Path(d) for d in network_dirs])
        self._lock = threading.Lock()

    def check(self, p: GenParams) -> None:
        if not 1 <= p.steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1..{MAX_STEPS}")
        if p.width % LATENT_FACTOR or p.height % LATENT_FACTOR or p.width < 8 or p.height < 8:
            raise ValueError(f"width and height must be positive multiples of {LATENT_FACTOR}")
        if p.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        _scheduler(self.model, p.sampler)

    def generate(self, p: GenParams, progress: Optional[Progress] = None) -> GenResult:
        self.check(p)
        with self._lock:
            t0 = time.perf_counter()
            try:
                return self._generate(p, progress or (lambda s, n, phase: None), t0)
            finally:
                self.patcher.restore()

    @contextmanager
    def unpatched(self) -> Iterator[dict]:
        """The model's own weights (no network applied: every generation restores them) as a state dict named
        as `Model.patch_root` names them, held against a concurrent generation until the block ends: the base
        an export reads for the types whose ΔW depends on W (DoRA, OFT, BOFT, IA3, GLoRA). The tensors are the
        model's own (no copy): read them, never write them."""
        with self._lock:
            yield self.model.patch_root().state_dict()

    # --- internals ------------------------------------------------------------------------------------
    def _generate(self, p: GenParams, progress: Progress, t0: float) -> GenResult:
        model = self.model
        self.runtime.refresh()
        act = self.runtime.activate(self.patcher, p.prompt, p.steps, mode=p.mode)
        warnings = list(act.warnings)          # the engine has logged these
        more = []
        neg = parse_prompt(p.negative)
        if neg.requests:
            more.append("network tags in the negative prompt are ignored (as in the WebUI); removed from it")
        negative = neg.prompt if neg.requests else p.negative
        hires = p.hires_scale > 1
        hsteps = (p.hires_steps or p.steps) if hires else None
        if hires:   # Runtime.activate checked the first pass; the hires pass's problems are added here
            more += [w for req in act.requests for w in req.check_steps(p.steps, hsteps) if w not in warnings]
        for w in more:
            log.warning("%s", w)
        warnings += more
        gen = torch.Generator().manual_seed(int(p.seed))
        shape = (1, 4, p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)

        sched = _scheduler(model, p.sampler)
        sched.set_timesteps(p.steps)
        latents = noise * sched.init_noise_sigma
        latents = self._denoise(p, act.requests, act.prompt, negative, sched, list(sched.timesteps), latents, gen,
                                p.steps, False, progress, (p.width, p.height))
        weights = {req.name: step_table(req, p.steps) for req, _ in act.used}
        labels = _labels([req for req, _ in act.used])
        series = [line for (req, _), label in zip(act.used, labels)
                  for line in weight_series(req, model.arch, p.steps, label=label)]
        hires_weights = {}
        if hires:
            w2, h2 = _snap(p.width * p.hires_scale), _snap(p.height * p.hires_scale)
            latents = F.interpolate(latents, size=(h2 // LATENT_FACTOR, w2 // LATENT_FACTOR), mode="bilinear",
                                    align_corners=False)
            sched = _scheduler(model, p.sampler)
            sched.set_timesteps(hsteps)
            start = hsteps - max(1, min(hsteps, int(round(hsteps * p.denoise))))
            timesteps = list(sched.timesteps[start * sched.order:])
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start * sched.order)
            renoise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
            latents = sched.add_noise(latents, renoise, timesteps[0].reshape(1))
            latents = self._denoise(p, act.requests, act.prompt, negative, sched, timesteps, latents, gen,
                                    len(timesteps), True, progress, (w2, h2))
            hires_weights = {req.name: step_table(req, len(timesteps), hires=True) for req, _ in act.used}
            series += [line for (req, _), label in zip(act.used, labels)
                       for line in weight_series(req, model.arch, len(timesteps), hires=True, label=label)]
        image = self._decode(latents)
        size = image.size
        text = infotext(p, model, act.hashes, {"Hires resize": f"{size[0]}x{size[1]}"} if hires else None)
        return GenResult(image=image, infotext=text, warnings=warnings, weights=weights,
                         hires_weights=hires_weights, seconds=time.perf_counter() - t0, series=series)

    @torch.no_grad()
    def _denoise(self, p: GenParams, requests: list, prompt: str, negative: str, sched, timesteps: list,
                 latents: torch.Tensor, gen: torch.Generator, total: int, hires: bool, progress: Progress,
                 size: tuple) -> torch.Tensor:
        model, patcher = self.model, self.patcher
        device, dtype = model.device, model.dtype
        segments = te_segments(requests, total, hires)
        conds = []
        for seg in segments:
            patcher.set_step(seg.start, total, hires)
            conds.append((seg, model.encode([prompt, negative])))
        phase = "hires" if hires else "sampling"
        for i, t in enumerate(timesteps, start=1):
            patcher.set_step(i, total, hires)
            hidden, pooled = next(c for s, c in conds if s.start <= i <= s.stop)
            x = sched.scale_model_input(torch.cat([latents] * 2), t).to(device, dtype)
            kw = {}
            if model.arch == "sdxl":
                time_ids = torch.tensor([[size[1], size[0], 0, 0, size[1], size[0]]] * 2, device=device, dtype=dtype)
                kw["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
            out = model.unet(x, t, encoder_hidden_states=hidden, **kw).sample.float().cpu()
            cond, uncond = out.chunk(2)
            guided = uncond + p.cfg * (cond - uncond)
            latents = sched.step(guided, t, latents, generator=gen).prev_sample
            progress(i, total, phase)
        return latents

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.model.vae
        x = vae.decode((latents / self.model.vae_scale).to(self.model.device, vae.dtype)).sample
        x = ((x[0].float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)   # (3, H, W) in 0..255
        return Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))


def weight_series(req: NetworkRequest, arch: str, total: int, hires: bool = False,
                  label: Optional[str] = None) -> list[WeightSeries]:
    """The plot lines of one tag in one pass, every value from `req.weight(component, block, step, total)`.

    Always `<label> te` (text encoders, × LBW BASE) and `<label> unet` (UNet modules outside the blocks).
    When some UNet block's weight differs from that (in=/mid=/out=/lbw=), also one line per coarse block group
    `<label> unet in|mid|out`; a group whose blocks differ (lbw=) gets one line per set of equal blocks, named by
    their LBW ids (`unet in IN04-IN05`).

    Args:
        req: the tag.
        arch: 'sd1' | 'sd2' | 'sdxl': which LBW block ids the UNet has.
        total: steps of this pass.
        hires: the hires pass (hr, hrte, hrunet weights; labels end in ' (hires)').
        label: the network's name in the legend (default `req.name`).
    """
    name, tag = label or req.name, " (hires)" if hires else ""
    steps = range(1, total + 1)
    # Between two steps the engine interpolates only for interp=linear, and only while start/stop keeps it on.
    ramps = tuple(req.interp == LINEAR and req.active(s, total) and req.active(s + 1, total) for s in steps[:-1])

    def values(component: str, block: Optional[str]) -> tuple[float, ...]:
        return tuple(req.weight(component, block, s, total, hires) for s in steps)

    unet = values("unet", None)
    lines = [WeightSeries(f"{name} te{tag}", values("te1", "BASE"), ramps, hires),
             WeightSeries(f"{name} unet{tag}", unet, ramps, hires)]
    order = arch_block_ids(arch)
    groups: dict[str, dict[tuple[float, ...], list[str]]] = {}    # in|mid|out -> values -> block ids
    for block in order:
        group = coarse_block(block)
        if group != "te":
            groups.setdefault(group, {}).setdefault(values("unet", block), []).append(block)
    if all(v == unet for by_values in groups.values() for v in by_values):
        return lines
    for group, by_values in groups.items():
        for v, ids in by_values.items():
            which = "" if len(by_values) == 1 else " " + _id_ranges(ids, order)
            lines.append(WeightSeries(f"{name} unet {group}{which}{tag}", v, ramps, hires))
    return lines


def _id_ranges(ids: list, order: tuple) -> str:
    """'IN00-IN03,IN06': runs of ids that are neighbours in `order` written as first-last."""
    index = sorted(order.index(i) for i in ids)
    runs = [[index[0], index[0]]]
    for i in index[1:]:
        if i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(order[a] if a == b else f"{order[a]}-{order[b]}" for a, b in runs)


def _labels(requests: list) -> list[str]:
    """Legend names: the network name, with ' #2', ' #3'... when one prompt names a network more than once."""
    seen: dict[str, int] = {}
    out = []
    for req in requests:
        seen[req.name] = seen.get(req.name, 0) + 1
        out.append(req.name if seen[req.name] == 1 else f"{req.name} #{seen[req.name]}")
    return out


def _snap(value: float) -> int:
    """A size rounded down to a multiple of the latent factor (at least one latent pixel)."""
    return max(LATENT_FACTOR, int(value) // LATENT_FACTOR * LATENT_FACTOR)
