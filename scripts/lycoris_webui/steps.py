"""Per-step weights (`on_cfg_denoiser`) and text-encoder schedules (the host's cond function, per segment)."""
from __future__ import annotations

import logging
import math

from .host import HOST, Host

log = logging.getLogger("lycoris")


def on_cfg_denoiser(params) -> None:
    """Move scheduled multipliers to the step the denoiser is about to run."""
    host = HOST
    act = host.activation
    if act is None or not any(r.is_scheduled() for r, _ in act.used):
        return
    den = getattr(params, "denoiser", None)
    if den is None:    # A1111 < 1.8 passes no denoiser: the sampler's own (its `step` counts calls too)
        den = getattr(getattr(host.processing, "sampler", None), "model_wrap_cfg", None)
    calls = getattr(den, "step", None)
    expected = getattr(den, "total_steps", None) or host.steps
    if calls is None:  # no denoiser object at all: the state counter, which lags one call behind
        calls = int(getattr(params, "sampling_step", 0))
        expected = int(getattr(params, "total_sampling_steps", host.steps) or host.steps)
    step = min(host.steps, int(calls * host.steps / max(int(expected), 1)) + 1)
    with host.lock:
        if host._patcher is not None and host.activation is act:
            try:
                host._patcher.set_step(step, host.steps, host.hires)
            except Exception:   # rolled back: the weights stay those of the previous step
                log.exception("step %d: scheduled weights not moved; the previous step's stay", step)


def splice_schedules(per_segment: list, ends: list) -> list:
    """One prompt's scheduled conds from one list per te segment.

    Args:
        per_segment: for each te segment, [(end_at_step, cond), ...] as the host computed it with that
            segment's text-encoder weights (same prompt, so the same end_at_steps in each).
        ends: the last 0-based step index of each segment (ascending; the last is open-ended).
    Returns: [(end_at_step, cond)] switching at every prompt-edit step and every segment end.
    """
    prompt_ends = [e for e, _ in per_segment[0]]
    cuts = sorted(set(prompt_ends) | {e for e in ends[:-1] if e < prompt_ends[-1]})
    out = []
    for c in cuts:
        j = next((i for i, e in enumerate(ends) if c <= e), len(ends) - 1)
        sched = per_segment[j]
        k = next((i for i, (e, _) in enumerate(sched) if c <= e), len(sched) - 1)
        out.append((c, sched[k][1]))
    return out


def _te_scheduled(function, host: Host):
    """The host's cond function, run once per te segment with the text-encoder weights of that segment."""
    act = host.activation
    if act is None or len(act.te_segments) <= 1 or host._patcher is None:
        return function
    from modules import prompt_parser
    segments, steps, hires, patcher = list(act.te_segments), host.steps, host.hires, host._patcher

    def encode(model, prompts, cond_steps, hires_steps=None, use_old_scheduling=False):
        results = []
        try:
            for seg in segments:
                patcher.set_step(seg.start, steps, hires)
                results.append(function(model, prompts, cond_steps, hires_steps, use_old_scheduling))
        finally:
            patcher.set_step(1, steps, hires)
        unit = (hires_steps or cond_steps) / steps            # cond steps per sampling step
        ends = [max(0, math.ceil(seg.stop * unit) - 1) for seg in segments]
        SPC = prompt_parser.ScheduledPromptConditioning

        def merge(lists):
            return [SPC(e, c) for e, c in splice_schedules([[(x.end_at_step, x.cond) for x in l] for l in lists],
                                                           ends)]
        first = results[0]
        if isinstance(first, prompt_parser.MulticondLearnedConditioning):
            for i, row in enumerate(first.batch):
                for k, comp in enumerate(row):
                    comp.schedules = merge([r.batch[i][k].schedules for r in results])
            return first
        return [merge([r[i] for r in results]) for i in range(len(first))]

    log.info("text encoder scheduled: prompt encoded %d times (segments %s)", len(segments),
             ", ".join(f"{s.start}-{s.stop}" for s in segments))
    return encode


def _install_cond_wrapper(p) -> None:
    """Wrap `p.get_conds_with_caching` (this object only) so te schedules reach the sampler."""
    if getattr(p, "_lycoris_cond_wrapper", False) or not hasattr(p, "get_conds_with_caching"):
        return
    original = p.get_conds_with_caching

    def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        return original(_te_scheduled(function, HOST), required_prompts, steps, caches, extra_network_data,
                        hires_steps)
    p.get_conds_with_caching = get_conds_with_caching
    p._lycoris_cond_wrapper = True


def forget_conds_after(p) -> None:
    """This generation neither reads nor keeps the host's cached conds. A1111 keys that cache by prompt and
    tags, not by whether the networks were applied: after a failed apply (the image made without them) the
    cache may hold the image before's conds with the same tags (text encoder patched), and what this image
    computes without the networks must not serve the next one."""
    if not hasattr(p, "get_conds_with_caching"):
        return
    original = p.get_conds_with_caching

    def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        for cache in caches:
            cache[0] = None
        try:
            return original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
        finally:
            for cache in caches:
                cache[0] = None
    p.get_conds_with_caching = get_conds_with_caching
