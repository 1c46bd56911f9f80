"""WebUI glue (AUTOMATIC1111 1.7-1.10, Forge): host objects in, lib_lycoris calls out.

What this file owns, and nothing more (the logic lives in lib_lycoris):
- the `lora` extra network (and its `lyco` alias), registered after the built-in Lora extension so that
  ours replaces it in the host's registry; the built-in page and API routes are replaced the same way;
- one `Patcher` per loaded model (dropped when the host loads another checkpoint), activation per batch,
  per-step weights in `on_cfg_denoiser`, hires weights in the hires pass, restore in `deactivate`;
- text-encoder schedules: the conditioning function the host calls is wrapped (on this `p` only) so that the
  prompt is encoded once per te-weight segment and the segments are spliced into the host's scheduled conds;
- infotext (`Lora hashes`, warnings), pasting, settings, the Networks tab page and the API routes.
"""
from __future__ import annotations

import html
import logging
import math
import os
import re
import threading
from typing import Optional

from modules import extra_networks, script_callbacks, shared

from lib_lycoris.errors import LycorisError
from lib_lycoris.files import read_metadata
from lib_lycoris.patcher import Patcher
from lib_lycoris.runtime import DEFAULT_CACHE_BYTES, Runtime
from lib_lycoris.tags import parse_prompt

log = logging.getLogger("lycoris")

SECTION = ("lycoris", "LyCORIS loader")
MODES = ("merge", "bypass")
# Infotext keys; "Lora hashes" is A1111's key and format (image sites read it).
INFOTEXT_HASHES = "Lora hashes"
INFOTEXT_WARNINGS = "Lora warnings"
INFOTEXT_TRIGGERS = "Lora trigger words"
# Longest warning text put into the infotext (the full text is in the UI comment and the log).
INFOTEXT_WARNING_LIMIT = 300
# Placeholder in the prompt that trigger words replace (SD.Next's convention).
TAGS_PLACEHOLDER = "_tags_"
BASE_MODEL_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "unknown": "unknown"}
_TAG_NAME = re.compile(r"<(lora|lyco):([^:>]+)", re.IGNORECASE)


def _opt(name: str, default):
    return getattr(shared.opts, name, default) if getattr(shared, "opts", None) is not None else default


def _keep_backups() -> Optional[bool]:
    """Patcher.keep_backups from the setting: on = the engine's default (kept where in host memory)."""
    return None if _opt("lycoris_keep_backups", True) else False


# --------------------------------------------------------------------------------------------------
# Host model -> engine components

def model_components(sd_model) -> dict:
    """{'unet': ..., 'te1': ..., 'te2': ...} of the host's loaded model (A1111 or Forge)."""
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        comps = {"unet": forge.unet.model.diffusion_model}
        te = getattr(forge.clip, "cond_stage_model", None)
        # SD1 clip_l; SD2 clip_h (OpenCLIP-H in HF layout); SDXL clip_l + clip_g
        for key, name in (("te1", "clip_l"), ("te1", "clip_h"), ("te2", "clip_g")):
            enc = getattr(te, name, None) if te is not None else None
            if enc is not None and key not in comps:
                comps[key] = getattr(enc, "transformer", enc)
        if "te1" not in comps and "te2" in comps:   # a single OpenCLIP-G encoder
            comps["te1"] = comps.pop("te2")
        return comps
    comps = {"unet": sd_model.model.diffusion_model}
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:   # SDXL: embedders 0 (CLIP-L, HF) and 1 (OpenCLIP-G)
        encoders = [e for e in conditioner.embedders if hasattr(e, "wrapped") or hasattr(e, "transformer")
                    or hasattr(e, "model")]
        for key, emb in zip(("te1", "te2"), encoders):
            comps[key] = _text_tower(getattr(emb, "wrapped", emb))
    else:
        cond = getattr(sd_model, "cond_stage_model", None)
        if cond is not None:
            comps["te1"] = _text_tower(getattr(cond, "wrapped", cond))
    return {k: v for k, v in comps.items() if v is not None}


def _text_tower(embedder):
    """The HF CLIPTextModel (`.transformer`) or the OpenCLIP model (`.model`) inside an embedder."""
    return getattr(embedder, "transformer", None) or getattr(embedder, "model", None)


def model_arch(sd_model) -> str:
    if sd_model is None:
        return "unknown"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# Process-wide state of the extension (one host process, one loaded model at a time)

class Host:
    """The runtime (name index + network cache), the patcher of the loaded model, the active batch."""

    def __init__(self) -> None:
        self._runtime: Optional[Runtime] = None
        self._patcher: Optional[Patcher] = None
        self._patcher_model = None
        self.lock = threading.RLock()
        self.activation = None             # the last Activation of this batch
        self.steps = 1
        self.hires = False
        self.processing = None             # the batch's processing object (its sampler), until restore

    # --- folders and cache ------------------------------------------------------------------------
    @staticmethod
    def roots() -> list:
        opts = getattr(shared, "cmd_opts", None)
        roots = []
        for attr in ("lora_dir", "lyco_dir_backcompat", "lyco_dir"):
            d = getattr(opts, attr, None) if opts is not None else None
            if d and d not in roots:
                roots.append(d)
        return roots

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            roots = self.roots()
            for r in roots[:1]:
                os.makedirs(r, exist_ok=True)
            budget = int(_opt("lycoris_cache_mb", DEFAULT_CACHE_BYTES >> 20)) << 20
            self._runtime = Runtime([r for r in roots if os.path.isdir(r)], cache_bytes=budget)
        return self._runtime

    def refresh(self) -> None:
        self.runtime.refresh()
        self.runtime.cache.budget = int(_opt("lycoris_cache_mb", DEFAULT_CACHE_BYTES >> 20)) << 20

    def short_hash(self, path) -> Optional[str]:
        """A1111's `shorthash` of a network file (the engine's `Runtime.short_hash`, cached per mtime)."""
        return self.runtime.short_hash(path)

    # --- the patcher of the loaded model --------------------------------------------------------
    def patcher(self, sd_model) -> Patcher:
        if self._patcher is None or self._patcher_model is not sd_model:
            self._patcher = Patcher.from_components(model_components(sd_model), keep_backups=_keep_backups())
            self._patcher_model = sd_model
            log.info("patcher ready for %s (%s)", type(sd_model).__name__, self._patcher.modelmap.arch)
        return self._patcher

    def model_loaded(self, sd_model) -> None:
        """A new checkpoint (or new weights in the same object): the old backups are stale, drop them."""
        with self.lock:
            self._patcher = None
            self._patcher_model = None
            self.activation = None
            self.processing = None

    def keep_backups_changed(self) -> None:
        """The setting went off: free the kept backups now; either way it holds for the next apply."""
        with self.lock:
            if self._patcher is not None:
                self._patcher.keep_backups = _keep_backups()
                if self._patcher.keep_backups is False:
                    log.info("freed %d MB of kept weight backups", self._patcher.release_backups() >> 20)

    def restore(self) -> None:
        with self.lock:
            if self._patcher is not None:
                self._patcher.restore()
            self.activation = None
            self.processing = None


HOST = Host()


# --------------------------------------------------------------------------------------------------
# Per-batch activation

def _tags_of(params_list) -> str:
    """The host's ExtraNetworkParams back to tag text, for the engine's parser (full grammar)."""
    return " ".join("<lora:" + ":".join(str(i) for i in params.items) + ">" for params in params_list)


def _pass_steps(p) -> tuple:
    hires = bool(getattr(p, "is_hr_pass", False))
    steps = int(getattr(p, "steps", 1) or 1)
    if hires:
        steps = int(getattr(p, "hr_second_pass_steps", 0) or steps)
    return steps, hires


class ExtraNetworkLycoris(extra_networks.ExtraNetwork):
    """The `lora` extra network: activate = resolve + load + apply; deactivate = bit-exact restore."""

    def __init__(self, host: Host = HOST) -> None:
        super().__init__("lora")
        self.host = host

    def activate(self, p, params_list) -> None:
        host = self.host
        steps, hires = _pass_steps(p)
        parsed = parse_prompt(_tags_of(params_list))
        sd_model = getattr(p, "sd_model", None) or shared.sd_model
        with host.lock:
            if not parsed.requests and host._patcher is None:
                host.activation = None
                return
            patcher = host.patcher(sd_model)
            mode = _opt("lycoris_apply_mode", "merge")
            act = host.runtime.activate(patcher, parsed.requests, steps, hires=hires,
                                        mode=mode if mode in MODES else "merge", step=1)
            act.warnings[:0] = parsed.warnings
            host.activation, host.steps, host.hires = act, steps, hires
            host.processing = p
        for w in parsed.warnings:   # the tag parse is ours; the engine logged its own warnings
            log.warning("%s", w)
        if act.requests:
            _write_infotext(p, act, hires)
            _add_trigger_words(p, act)
            _install_cond_wrapper(p)

    def deactivate(self, p) -> None:
        self.host.restore()


def _write_infotext(p, act, hires: bool) -> None:
    params = getattr(p, "extra_generation_params", None)
    if params is None:
        return
    if hasattr(p, "comment"):
        for w in act.warnings:
            p.comment(w)
    if act.warnings:
        text = "; ".join(act.warnings)
        if len(text) > INFOTEXT_WARNING_LIMIT:
            text = text[: INFOTEXT_WARNING_LIMIT - 1] + "…"
        params[INFOTEXT_WARNINGS] = text.replace('"', "'")
    if not _opt("lycoris_add_hashes_to_infotext", True):
        return
    # A1111 #16062: the hires pass adds to the first pass's hashes instead of replacing them.
    hashes = getattr(p, "lycoris_hashes", None) if hires else None
    hashes = dict(hashes or {})
    for name, h in act.hashes:
        hashes[name.replace(":", "").replace(",", "")] = h
    p.lycoris_hashes = hashes
    if hashes:
        params[INFOTEXT_HASHES] = ", ".join(f"{k}: {v}" for k, v in hashes.items())


def _add_trigger_words(p, act) -> None:
    """Opt-in: the networks' trigger words into the prompts of this batch, before they are encoded."""
    top = int(_opt("lycoris_trigger_words", 0))
    if top == 0 or getattr(p, "is_hr_pass", False) or not getattr(p, "prompts", None):
        return
    from lib_lycoris.inspect import trigger_words
    words = []
    for req, net in act.used:
        found = trigger_words(net.metadata, extra_networks.get_user_metadata(str(net.path)))
        words += found if top < 0 else found[:top]
    if not words:
        return
    p.prompts = [insert_words(prompt, words) for prompt in p.prompts]
    if hasattr(p, "extra_generation_params"):
        p.extra_generation_params[INFOTEXT_TRIGGERS] = ", ".join(dict.fromkeys(words))


def insert_words(prompt: str, words: list) -> str:
    """`_tags_` replaced by the words not already in the prompt, or those words appended."""
    lowered = prompt.lower()
    fresh = [w for w in dict.fromkeys(words)
             if not re.search(r"(?<!\w)" + re.escape(w.lower()) + r"(?!\w)", lowered)]
    text = ", ".join(fresh)
    if TAGS_PLACEHOLDER in prompt:
        return prompt.replace(TAGS_PLACEHOLDER, text)
    if not fresh:
        return prompt
    return f"{prompt}, {text}" if prompt.strip() else text


# --------------------------------------------------------------------------------------------------
# Per-step weights and text-encoder schedules

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
            host._patcher.set_step(step, host.steps, host.hires)


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


# --------------------------------------------------------------------------------------------------
# Infotext paste

def on_infotext_pasted(infotext: str, params: dict) -> None:
    """`Lora hashes` -> the local names of the networks with those hashes (A1111 behaviour)."""
    hashes = params.get(INFOTEXT_HASHES)
    prompt = params.get("Prompt")
    if not hashes or not isinstance(prompt, str):
        return
    wanted = {}
    for part in str(hashes).split(","):
        name, _, h = part.partition(":")
        if h.strip():
            wanted[name.strip()] = h.strip()
    if not wanted:
        return
    by_hash = {}

    def local_name(h: str) -> Optional[str]:
        if not by_hash:
            for e in HOST.runtime.index.entries():
                eh = HOST.short_hash(e.path)
                if eh:
                    by_hash.setdefault(eh, e)
        e = by_hash.get(h)
        return None if e is None else tag_name(e)

    def replace(m):
        kind, name = m.group(1), m.group(2)
        h = wanted.get(name.strip())
        if h is None:
            return m.group(0)
        try:
            if HOST.short_hash(HOST.runtime.index.resolve(name)) == h:
                return m.group(0)
        except LycorisError:
            pass   # not found under this name: look it up by hash below
        local = local_name(h)
        return m.group(0) if local is None else f"<{kind}:{local}"

    params["Prompt"] = _TAG_NAME.sub(replace, prompt)


# --------------------------------------------------------------------------------------------------
# Names, cards, API

def tag_name(entry) -> str:
    """What a card inserts: the stem when no other file has it, else the sub-folder path."""
    stems = [e.stem.casefold() for e in HOST.runtime.index.entries()]
    return entry.stem if stems.count(entry.stem.casefold()) == 1 else entry.relname


def base_model_of(path, metadata: dict) -> str:
    """'sd1'|'sd2'|'sdxl'|'unknown' for a card: metadata, else key names and shapes of the header."""
    from lib_lycoris.network import base_model_from_metadata, base_model_of_file
    found = base_model_from_metadata(metadata)
    if found:
        return found[0]
    try:
        return base_model_of_file(path)[0]
    except LycorisError as e:
        log.warning("%s", e)
        return "unknown"


def network_json(entry) -> dict:
    try:
        md = read_metadata(entry.path)
    except LycorisError as e:
        log.warning("%s", e)
        md = {}
    return {"name": entry.relname, "alias": entry.alias or entry.stem, "path": str(entry.path), "metadata": md}


def inspect_network(name: str) -> dict:
    from lib_lycoris.inspect import describe
    entry = HOST.runtime.index.resolve_entry(name)
    net = HOST.runtime.cache.get(entry.path, entry.stem)
    info = describe(net, extra_networks.get_user_metadata(str(entry.path)))
    info["hash"] = HOST.short_hash(entry.path)
    return info


def _replace_routes(app, paths: set) -> None:
    """Drop routes other handlers (the built-in Lora extension) registered for these paths."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in paths]


def on_app_started(_demo, app) -> None:
    from fastapi import HTTPException
    take_over()
    _replace_routes(app, {"/sdapi/v1/loras", "/sdapi/v1/refresh-loras"})

    @app.get("/sdapi/v1/loras")
    def get_loras():
        return [network_json(e) for e in HOST.runtime.index.entries()]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        HOST.refresh()

    @app.get("/sdapi/v1/lycoris/inspect")
    def inspect(name: str):
        try:
            return inspect_network(name)
        except LycorisError as e:
            raise HTTPException(status_code=404, detail=str(e)) from e

    @app.get("/sdapi/v1/lycoris/status")
    def status():
        reg = extra_networks.extra_network_registry.get("lora")
        alias = extra_networks.extra_network_aliases.get("lyco")
        act = HOST.activation
        return {"lora_handler": type(reg).__module__ + "." + type(reg).__name__ if reg else None,
                "lyco_alias_is_ours": isinstance(alias, ExtraNetworkLycoris),
                "roots": [str(r) for r in HOST.runtime.roots],
                "networks": len(HOST.runtime.index.entries()),
                "cache": {"networks": len(HOST.runtime.cache), "bytes": HOST.runtime.cache.nbytes,
                          "hits": HOST.runtime.cache.hits, "misses": HOST.runtime.cache.misses},
                "active": [r.name for r, _ in act.used] if act else []}


# --------------------------------------------------------------------------------------------------
# Networks tab (classes built on first use: the host's UI modules import gradio)

def _embedded_preview(page, base: str, name: str, md: dict) -> Optional[str]:
    """The preview embedded in the file's metadata (A1111 >= 1.9 only; older hosts have no such method)."""
    find = getattr(page, "find_embedded_preview", None)
    return find(base, name, md) if find is not None else None


def card_item(page, entry, index: int, shared_opts) -> Optional[dict]:
    """The host's card dict for one network file (None = hidden by the base-model filter)."""
    from modules.ui_extra_networks import quote_js
    path = str(entry.path)
    base, _ = os.path.splitext(path)
    try:
        md = read_metadata(entry.path)
    except LycorisError as e:
        log.warning("%s", e)
        md = {}
    arch = base_model_of(entry.path, md)
    item = {
        "name": entry.relname,
        "filename": path,
        "shorthash": None,
        "preview": page.find_preview(base) or _embedded_preview(page, base, entry.relname, md),
        "description": page.find_description(base),
        "search_terms": [page.search_terms_from_path(path), BASE_MODEL_LABELS[arch]],
        "local_preview": f"{base}.{shared_opts.samples_format}",
        "metadata": md,
        "sort_keys": {"default": index, **page.get_sort_keys(path)},
        "sd_version": BASE_MODEL_LABELS[arch],
    }
    page.read_user_metadata(item)
    user = item["user_metadata"]
    chosen = user.get("sd version")
    if chosen in ("SD1", "SD2", "SDXL"):
        arch = chosen.lower()
        item["sd_version"] = chosen
    loaded = model_arch(shared.sd_model) if getattr(shared, "sd_model", None) is not None else "unknown"
    if (_opt("lycoris_hide_mismatched", False) and arch != "unknown" and loaded != "unknown"
            and arch != loaded):
        return None
    from lib_lycoris.inspect import trigger_words, training_tags
    triggers = trigger_words(md, user)
    weight = float(user.get("preferred weight", 0.0) or 0.0)
    item["prompt"] = (quote_js(f"<lora:{tag_name(entry)}:") + " + "
                      + (repr(weight) if weight else "opts.extra_networks_default_multiplier")
                      + " + " + quote_js(">"))
    if user.get("activation text"):
        item["prompt"] += " + " + quote_js(" " + user["activation text"])
    item["negative_prompt"] = quote_js("(" + user["negative text"] + ":1)") if user.get("negative text") else quote_js("")
    badge = f"[{BASE_MODEL_LABELS[arch]}]" + (f" {', '.join(triggers)}" if triggers else "")
    item["description"] = badge + (f" {item['description']}" if item.get("description") else "")
    item["metadata"] = {**md, "lycoris: base model": BASE_MODEL_LABELS[arch], "lycoris: trigger words": triggers,
                        "lycoris: training tags": training_tags(md)}
    return item


def make_page(ui_extra_networks):
    """The page class, made against the host's base class."""

    class LycorisPage(ui_extra_networks.ExtraNetworksPage):
        lycoris = True

        def __init__(self) -> None:
            super().__init__("Lora")
            self.allow_negative_prompt = True

        def refresh(self) -> None:
            HOST.refresh()

        def create_item(self, name, index=None, enable_filter=True):
            try:
                entry = HOST.runtime.index.resolve_entry(name)
            except LycorisError as e:
                log.warning("%s", e)
                return None
            if index is None:
                index = 0
            item = card_item(self, entry, index, shared.opts)
            if item is None and not enable_filter:
                with _filter_off():
                    item = card_item(self, entry, index, shared.opts)
            return item

        def list_items(self):
            for index, entry in enumerate(HOST.runtime.index.entries()):
                item = card_item(self, entry, index, shared.opts)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return [str(r) for r in HOST.roots()]

        def create_user_metadata_editor(self, ui, tabname):
            return make_editor()(ui, tabname, self)

    return LycorisPage


class _filter_off:
    def __enter__(self):
        self.old = _opt("lycoris_hide_mismatched", False)
        shared.opts.lycoris_hide_mismatched = False

    def __exit__(self, *exc):
        shared.opts.lycoris_hide_mismatched = self.old


def make_editor():
    """User metadata editor: activation text, preferred weight, negative text, notes (stored beside the file)."""
    import gradio as gr
    from modules import ui_extra_networks_user_metadata as base

    class LycorisMetadataEditor(base.UserMetadataEditor):
        def save_lycoris_user_metadata(self, name, desc, sd_version, activation_text, preferred_weight,
                                       negative_text, notes):
            md = self.get_user_metadata(name)
            md.update({"description": desc, "sd version": sd_version, "activation text": activation_text,
                       "preferred weight": preferred_weight, "negative text": negative_text, "notes": notes})
            self.write_user_metadata(name, md)

        def get_metadata_table(self, name):
            table = super().get_metadata_table(name)
            try:
                info = inspect_network(name)
            except LycorisError as e:
                table.append(("LyCORIS:", html.escape(str(e))))
                return table
            rows = [("Base model:", f"{BASE_MODEL_LABELS.get(info['base_model'], info['base_model'])} "
                                    f"({info['base_model_reason']})"),
                    ("Adapter types:", ", ".join(f"{k} ×{v}" for k, v in info["algos"].items())),
                    ("Modules:", str(info["modules"])),
                    ("Trigger words:", ", ".join(info["trigger_words"])),
                    ("Training tags:", ", ".join(f"{t} ({n})" for t, n in info["training_tags"]))]
            table += [(k, html.escape(v)) for k, v in rows if v]
            return table

        def put_values_into_components(self, name):
            from lib_lycoris.inspect import training_tags
            user = self.get_user_metadata(name)
            values = super().put_values_into_components(name)
            item = self.page.items.get(name, {})
            tags = training_tags(read_metadata(item["filename"])) if item.get("filename") else []
            return [*values[0:5], item.get("sd_version", "unknown"),
                    gr.update(value=[(t, str(n)) for t, n in tags], visible=bool(tags)),
                    user.get("activation text", ""), float(user.get("preferred weight", 0.0) or 0.0),
                    user.get("negative text", "")]

        def create_extra_default_items_in_left_column(self):
            self.select_sd_version = gr.Dropdown(["SD1", "SD2", "SDXL", "unknown"], value="unknown",
                                                 label="Base model", interactive=True)

        def create_editor(self):
            self.create_default_editor_elems()
            self.taginfo = gr.HighlightedText(label="Training dataset tags (click to add to the activation text)")
            self.edit_activation_text = gr.Text(label="Activation text", info="Added to the prompt with the tag")
            self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the default multiplier",
                                                     minimum=0.0, maximum=2.0, step=0.01)
            self.edit_negative_text = gr.Text(label="Negative prompt", info="Added to the negative prompt")
            self.edit_notes = gr.TextArea(label="Notes", lines=4)

            def select_tag(text, evt):
                words = [w for w in re.split(r" *, *", text or "") if w]
                tag = evt.value[0]
                return ", ".join([w for w in words if w != tag] if tag in words else words + [tag])
            select_tag.__annotations__ = {"evt": gr.SelectData}   # gradio finds the event argument by its hint
            self.taginfo.select(fn=select_tag, inputs=[self.edit_activation_text],
                                outputs=[self.edit_activation_text], show_progress=False)
            self.create_default_buttons()
            viewed = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview,
                      self.edit_notes, self.select_sd_version, self.taginfo, self.edit_activation_text,
                      self.slider_preferred_weight, self.edit_negative_text]
            self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input],
                                   outputs=viewed).then(fn=lambda: gr.update(visible=True), inputs=[],
                                                        outputs=[self.box])
            edited = [self.edit_description, self.select_sd_version, self.edit_activation_text,
                      self.slider_preferred_weight, self.edit_negative_text, self.edit_notes]
            self.setup_save_handler(self.button_save, self.save_lycoris_user_metadata, edited)

    return LycorisMetadataEditor


# --------------------------------------------------------------------------------------------------
# Registration

EXTRA_NETWORK = ExtraNetworkLycoris()


def take_over() -> None:
    """Make ours the `lora` handler, the `lyco` alias and the Lora page (idempotent).

    A1111 runs before_ui callbacks in reverse registration order, so the built-in Lora extension's
    before_ui runs after ours and registers its handler and page again; this is therefore also called
    from the first on_before_component (all before_ui done, Networks tab not yet built) and on_app_started.
    """
    if extra_networks.extra_network_registry.get("lora") is not EXTRA_NETWORK:
        extra_networks.register_extra_network(EXTRA_NETWORK)
        log.info("lycoris-loader handles <lora:...> and <lyco:...> (built-in Lora handler replaced)")
    extra_networks.register_extra_network_alias(EXTRA_NETWORK, "lyco")
    try:
        from modules import ui_extra_networks
    except ImportError as e:   # no UI (tests, hosts without gradio): tags still work
        log.debug("no Networks tab page: %s", e)
        return
    pages = ui_extra_networks.extra_pages
    if any(getattr(pg, "name", None) == "lora" and not getattr(pg, "lycoris", False) for pg in pages) or \
            not any(getattr(pg, "lycoris", False) for pg in pages):
        pages[:] = [pg for pg in pages if getattr(pg, "name", None) != "lora"]
        ui_extra_networks.register_page(make_page(ui_extra_networks)())


def before_ui() -> None:
    take_over()


_COMPONENTS_SEEN = []


def before_component(component, **kwargs) -> None:
    if not _COMPONENTS_SEEN:
        _COMPONENTS_SEEN.append(True)
        take_over()


def on_ui_settings() -> None:
    import gradio as gr
    section = SECTION
    opts = {
        "lycoris_apply_mode": shared.OptionInfo(
            "merge", "How networks are applied", gr.Radio, {"choices": list(MODES)}, section=section).info(
            "merge: written into the weights (fastest sampling); bypass: added at each layer's output "
            "(no weight written; cheaper when weights change every step)"),
        "lycoris_cache_mb": shared.OptionInfo(
            DEFAULT_CACHE_BYTES >> 20, "Memory for parsed networks kept between generations (MB)", gr.Number,
            {"precision": 0}, section=section),
        "lycoris_trigger_words": shared.OptionInfo(
            0, "Add trigger words of the networks in the prompt", gr.Slider,
            {"minimum": -1, "maximum": 16, "step": 1}, section=section).info(
            "0 = off, -1 = all, n = first n per network; _tags_ in the prompt marks where they go"),
        "lycoris_keep_backups": shared.OptionInfo(
            True, "Keep weight backups in RAM between generations", section=section).info(
            "as the built-in Lora does: the next image's networks are applied without copying the weights again; "
            "costs the touched weights' size in RAM (for a CPU model; GPU backups are never kept)"),
        "lycoris_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext", section=section),
        "lycoris_hide_mismatched": shared.OptionInfo(
            False, "Hide networks made for another base model than the loaded one", section=section),
    }
    for key, info in opts.items():
        shared.opts.add_option(key, info)
    shared.opts.onchange("lycoris_cache_mb", HOST.refresh)
    shared.opts.onchange("lycoris_keep_backups", HOST.keep_backups_changed)


def _model_loaded(sd_model) -> None:
    HOST.model_loaded(sd_model)


def _unload() -> None:
    HOST.restore()


script_callbacks.on_before_ui(before_ui)
script_callbacks.on_before_component(before_component)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_model_loaded(_model_loaded)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(_unload)
