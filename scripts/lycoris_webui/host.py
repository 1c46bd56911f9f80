"""The loaded model as the engine sees it, and the extension's process-wide state (`HOST`).

Host objects in (A1111's `sd_model`: SD1/SD2/SDXL, SD3 `SD3Inferencer`; Forge's `forge_objects`), engine
components out; which family the engine maps, and so whether the tags go to the host's built-in Lora.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import threading
from typing import Optional

from modules import shared

from lib_lycoris.blocks import ARCHS
from lib_lycoris.patcher import Patcher
from lib_lycoris.runtime import DEFAULT_CACHE_BYTES, Runtime

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
BASE_MODEL_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "unknown": "unknown"}
_TAG_NAME = re.compile(r"<(lora|lyco):([^:>]+)", re.IGNORECASE)


def _opt(name: str, default):
    return getattr(shared.opts, name, default) if getattr(shared, "opts", None) is not None else default


def _handback_setting() -> tuple:
    """Families the user hands to the built-in Lora (setting `lycoris_handback_families`)."""
    value = _opt("lycoris_handback_families", [])
    return tuple(value) if isinstance(value, (list, tuple)) else ()


def _host_dequantizer():
    """Forge's bitsandbytes NF4/FP4 dequantiser (its `Params4bit` has no `dequantize()`); None elsewhere.
    GGUF parameters and fp8 weights dequantise themselves."""
    try:
        from backend.operations_bnb import functional_dequantize_4bit
    except ImportError:
        return None
    return functional_dequantize_4bit


def _keep_backups() -> Optional[bool]:
    """Patcher.keep_backups from the setting: on = the engine's default (kept where in host memory)."""
    return None if _opt("lycoris_keep_backups", True) else False


# --------------------------------------------------------------------------------------------------
# Host model -> engine components

def _keep_applied() -> bool:
    return bool(_opt("lycoris_keep_applied", True))


def model_components(sd_model) -> dict:
    """{'unet': ..., 'te1': ..., 'te2': ..., 'te3': ...} of the host's loaded model (A1111 or Forge)."""
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        comps = {"unet": forge.unet.model.diffusion_model}
        te = getattr(forge.clip, "cond_stage_model", None)
        # SD1 clip_l; SD2 clip_h (OpenCLIP-H in HF layout); SDXL clip_l + clip_g; Flux clip_l + t5xxl
        for key, name in (("te1", "clip_l"), ("te1", "clip_h"), ("te2", "clip_g"), ("te3", "t5xxl")):
            enc = getattr(te, name, None) if te is not None else None
            if enc is not None and key not in comps:
                comps[key] = getattr(enc, "transformer", enc)
        if "te1" not in comps and "te2" in comps:   # a single OpenCLIP-G encoder
            comps["te1"] = comps.pop("te2")
        return comps
    comps = {"unet": sd_model.model.diffusion_model}
    encoders = getattr(sd_model, "text_encoders", None)
    if getattr(sd_model, "is_sd3", False) and encoders is not None:   # A1111 1.10 SD3: CLIP-L, CLIP-G, T5 (optional)
        for key, name in (("te1", "clip_l"), ("te2", "clip_g"), ("te3", "t5xxl")):
            enc = getattr(encoders, name, None)
            if enc is not None:
                comps[key] = getattr(enc, "transformer", enc)
        return comps
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
    """The loaded model's family from the host's flags (cheap; `Host.family` asks the engine)."""
    if sd_model is None:
        return "unknown"
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_flux", False) or type(sd_model).__name__ == "Flux":
        return "flux"
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
        self._families: dict = {}          # id(sd_model) -> (sd_model, family or None)

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
        """The patcher of `sd_model`; another model than the last one (A1111 reuses a model from its checkpoint
        cache without a model-loaded callback): the last one gets its original bits back first."""
        if self._patcher is not None and self._patcher_model is not sd_model:
            self._leave_model(sd_model)
        if self._patcher is None:
            self._patcher = Patcher.from_components(model_components(sd_model), keep_backups=_keep_backups(),
                                                    lowbit=_opt("lycoris_lowbit", "bypass"),
                                                    dequantize=_host_dequantizer())
            self._patcher_model = sd_model
            log.info("patcher ready for %s (%s)", type(sd_model).__name__, self._patcher.modelmap.arch)
        return self._patcher

    def family(self, sd_model) -> Optional[str]:
        """The engine's family of the loaded model ('sd1' .. 'flux'), None where the engine maps none of it
        (the built-in Lora then handles the tags: `handback_reason`). Read once per model object."""
        cached = self._families.get(id(sd_model))
        if cached is not None and cached[0] is sd_model:
            return cached[1]
        try:   # the patcher's map: low-bit (NF4, GGUF) weights bind by their logical shapes
            arch = self.patcher(sd_model).modelmap.arch
        except (AttributeError, TypeError, KeyError, ValueError, RuntimeError) as e:   # parts we don't know
            log.info("no model map for %s: %s", type(sd_model).__name__, e)
            arch = "unknown"
        family = arch if arch in ARCHS else None
        self._families = {id(sd_model): (sd_model, family)}
        log.info("loaded model %s: %s", type(sd_model).__name__,
                 f"{family}, networks applied by lycoris-loader" if family and family not in _handback_setting()
                 else "networks handed to the host's built-in Lora")
        return family

    def handback_reason(self, sd_model) -> Optional[str]:
        """Why this model's tags go to the host's built-in Lora (None: ours apply them)."""
        family = self.family(sd_model)
        if family is None:
            return f"the engine has no model map for {type(sd_model).__name__}"
        if family in _handback_setting():
            return f"{family} is set to the built-in Lora (setting lycoris_handback_families)"
        return None

    def model_loaded(self, sd_model) -> None:
        """A new checkpoint. New weights in the same object: the weights it changed are forgotten without a
        write (their backups are stale), the others restored. Another object: the old model, if it still
        holds networks (parked), gets its original bits back (A1111 may keep it in its checkpoint cache)."""
        self._model_changes(sd_model)
        if sd_model is not None:
            self.family(sd_model)   # one INFO line per model load: who applies its networks

    def before_reload(self) -> None:
        """The host is about to drop the loaded model and build another (Forge's `forge_model_reload`, at the
        generation after a checkpoint change; `install_reload_guard`): the old model gets its original bits
        back and nothing of ours holds it any more, so the host's own unload frees it before the new one
        loads (else both were alive at the load's peak: +5.5 GB in a CPU Forge with an SD1.5 LoCon)."""
        self._model_changes(None, collect=False)    # the host collects right after

    def _model_changes(self, sd_model, collect: bool = True) -> None:
        """The host changes the loaded model (`sd_model`: the new one, None: not there yet): no generation state
        or family of the last one is kept, and its patcher goes (`_leave_model`)."""
        with self.lock:
            self.activation = None
            self.processing = None
            self._families = {}
            self._leave_model(sd_model, collect)

    def release_idle_backups(self, sd_model) -> None:
        """No network is on `sd_model` now. Forge's built-in Lora frees its weight backups then, so ours are
        freed too on Forge; A1111's keeps its own for the model's life, so ours stay kept there."""
        patcher = self._patcher
        if patcher is not None and not patcher.active_networks and \
                getattr(sd_model, "forge_objects", None) is not None:
            freed = patcher.release_backups()
            if freed:
                log.info("no networks on the model: %.2f GB of kept backups freed (as Forge's Lora does)",
                         freed / 1e9)

    def _leave_model(self, sd_model, collect: bool = True) -> None:
        """Drop the patcher of the last model, its weights right first: `sd_model` the same object (new weights
        loaded into it): the weights that changed are forgotten without a write, the rest restored; another
        object (None: the host is about to drop it): all restored (it may live on in the host's checkpoint
        cache and come back). collect: run the garbage collector after (the host may do it itself)."""
        with self.lock:
            old, model = self._patcher, self._patcher_model
            self._patcher = self._patcher_model = None
            if old is None:
                return
            try:
                if model is sd_model:
                    forgotten = old.verify(reloaded=True)
                    if forgotten:
                        log.info("%d weight(s) reloaded by the host: their backups are dropped", forgotten)
                old.restore()
            except (RuntimeError, ValueError, TypeError) as e:   # the old model moved to 'meta', freed
                log.info("the previous model's weights were not restored (%s); its patcher is dropped", e)
            del old, model
            if self._families and sd_model is not None and id(sd_model) not in self._families:
                self._families = {}
            # the patcher held the old model's modules in reference cycles: free it now, not at some later
            # collection (Forge reloading bf16 -> fp8 kept 2.2 GB of the old model alive until then)
            if collect:
                gc.collect()

    def lowbit_changed(self) -> None:
        """The low-bit setting: the networks on low-bit weights are re-applied its way from the next image."""
        with self.lock:
            if self._patcher is not None:
                self._patcher.restore()
                self._patcher.lowbit = _opt("lycoris_lowbit", "bypass")

    def keep_backups_changed(self) -> None:
        """The setting went off: free the kept backups now; either way it holds for the next apply."""
        with self.lock:
            if self._patcher is not None:
                self._patcher.keep_backups = _keep_backups()
                if self._patcher.keep_backups is False:
                    log.info("freed %d MB of kept weight backups", self._patcher.release_backups() >> 20)

    def end_generation(self) -> None:
        """After a batch. Setting lycoris_keep_applied (default on), where backups stay in host memory anyway:
        the networks stay in the weights (parked), so the same set again costs nothing and another set
        rewrites only what changes; the next apply checks the weights first (`Patcher.verify`). Else: restore."""
        self._end(park=_keep_applied())

    def restore(self) -> None:
        self._end(park=False)

    def _end(self, park: bool) -> None:
        with self.lock:
            patcher = self._patcher
            if patcher is not None:
                if park and patcher.keeps_memory():
                    patcher.park()
                else:
                    patcher.restore()
                patcher.runtime_warnings.clear()   # logged when they happened (inside a forward)
            self.activation = None
            self.processing = None


HOST = Host()


def install_reload_guard() -> bool:
    """Forge builds a new model object for a new checkpoint, lazily in `forge_model_reload` at the next
    generation, and calls no extension before it drops the old one. Wrap that function (in
    `modules.sd_models`, and in `modules.processing`, which imported it by name) so that `HOST.before_reload`
    runs when a reload is pending. Returns whether installed; elsewhere (A1111) nothing is wrapped. Run again
    (a UI reload runs the scripts again, with a new HOST), it wraps the host's original anew."""
    try:
        from modules import sd_models
    except ImportError:
        return False
    current = getattr(sd_models, "forge_model_reload", None)
    model_data = getattr(sd_models, "model_data", None)
    if current is None or not hasattr(model_data, "forge_loading_parameters"):
        return False
    original = getattr(current, "lycoris_original", current)

    def forge_model_reload(*args, **kwargs):
        if getattr(model_data, "forge_hash", None) != str(model_data.forge_loading_parameters):  # Forge's own test
            try:
                HOST.before_reload()
            except Exception:    # never in the way of the host's load: the model-loaded callback follows
                log.exception("letting the old model go before the reload failed")
        return original(*args, **kwargs)
    forge_model_reload.lycoris_original = original
    forge_model_reload.__doc__ = original.__doc__
    modules = [sd_models]
    try:
        from modules import processing
        modules.append(processing)
    except ImportError:
        log.debug("modules.processing not importable: only sd_models.forge_model_reload is wrapped")
    for module in modules:
        if getattr(module, "forge_model_reload", None) in (current, original):
            module.forge_model_reload = forge_model_reload
    return True


def tag_name(entry) -> str:
    """What a card inserts: the stem when no other file has it, else the sub-folder path."""
    stems = [e.stem.casefold() for e in HOST.runtime.index.entries()]
    return entry.stem if stems.count(entry.stem.casefold()) == 1 else entry.relname
