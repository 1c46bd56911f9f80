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
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lib_lycoris.patcher import Patcher
from lib_lycoris.runtime import Runtime, te_segments
from lib_lycoris.tags import parse_prompt, step_table

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


@dataclass
class GenResult:
    image: Image.Image
    infotext: str
    warnings: list
    weights: dict = field(default_factory=dict)          # name -> {'te': [...], 'unet': [...]} per step
    hires_weights: dict = field(default_factory=dict)
    seconds: float = 0.0

    def weight_rows(self) -> list:
        """(step, weight, series) rows for a line plot; hires steps continue after the first pass."""
        rows = []
        for table, offset, tag in ((self.weights, 0, ""), (self.hires_weights, None, " (hires)")):
            if offset is None:
                offset = max((len(t["te"]) for t in self.weights.values()), default=0)
            for name, t in table.items():
                for part in ("te", "unet"):
                    rows += [(offset + i + 1, v, f"{name} {part}{tag}") for i, v in enumerate(t[part])]
        return rows

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
        image = self._decode(latents)
        size = image.size
        text = infotext(p, model, act.hashes, {"Hires resize": f"{size[0]}x{size[1]}"} if hires else None)
        return GenResult(image=image, infotext=text, warnings=warnings, weights=weights,
                         hires_weights=hires_weights, seconds=time.perf_counter() - t0)

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


def _snap(value: float) -> int:
    """A size rounded down to a multiple of the latent factor (at least one latent pixel)."""
    return max(LATENT_FACTOR, int(value) // LATENT_FACTOR * LATENT_FACTOR)
