"""WebUI glue (AUTOMATIC1111 1.7-1.10, Forge): host objects in, lib_lycoris calls out.

One module per concern; `scripts/lycoris_loader.py` (the file the host runs) loads this package and calls
`register()`:
- `host`: the loaded model's components and family, the process-wide state (`HOST`: runtime, patcher);
- `handler`: the `lora` extra network (and its `lyco` alias), registered after the built-in Lora so that
  ours replaces it; activation per batch, hand-back to the built-in, infotext, trigger words;
- `steps`: per-step weights in `on_cfg_denoiser`, text-encoder schedules spliced into the host's conds;
- `api`: API routes, infotext paste-back; `page`: the Networks tab page and its metadata editor;
- `export_tab`: the "Export LoRA" action (a tab and `POST /sdapi/v1/lycoris/export`).
"""
from __future__ import annotations

from modules import script_callbacks, shared

from lib_lycoris.blocks import ARCHS
from lib_lycoris.logs import install_fallback_handler
from lib_lycoris.runtime import DEFAULT_CACHE_BYTES

from . import export_tab
from .export_tab import export_current
from .api import base_model_of, inspect_network, network_json, on_app_started, on_infotext_pasted
from .handler import EXTRA_NETWORK, ExtraNetworkLycoris, insert_words, take_over
from .host import HOST, MODES, SECTION, Host, install_reload_guard, model_arch, model_components, tag_name
from .page import card_item, make_editor, make_page
from .steps import on_cfg_denoiser, splice_schedules

__all__ = ["EXTRA_NETWORK", "HOST", "ExtraNetworkLycoris", "Host", "base_model_of", "before_component", "before_ui",
           "card_item", "export_current", "insert_words", "inspect_network", "install_reload_guard", "make_editor",
           "make_page", "model_arch", "model_components", "network_json", "on_app_started", "on_cfg_denoiser",
           "on_infotext_pasted", "register", "splice_schedules", "tag_name", "take_over"]


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
            "costs the touched weights' size in RAM (for a CPU model; GPU backups are never kept; in Forge, "
            "freed once an image has no networks, as its built-in does)"),
        "lycoris_keep_applied": shared.OptionInfo(
            True, "Keep networks applied between generations", section=section).info(
            "as the built-in Lora does: the same networks again cost nothing, a strength change rewrites only the "
            "weights it changes; the weights are checked before each generation and restored exactly when the "
            "networks change, the model changes or the extension unloads (with kept backups only)"),
        "lycoris_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext", section=section),
        "lycoris_lowbit": shared.OptionInfo(
            "bypass", "Networks on low-bit weights (fp8, NF4, GGUF)", gr.Radio,
            {"choices": ["bypass", "stochastic"]}, section=section).info(
            "bypass: added at each layer's output, exact, stored weights never touched (a little slower per step); "
            "stochastic: fp8 only, merged with seeded stochastic rounding (no cost per step, noisy: the change "
            "survives on average, not per weight); NF4/GGUF always bypass"),
        "lycoris_handback_families": shared.OptionInfo(
            [], "Use the host's built-in Lora for these model families", gr.CheckboxGroup,
            {"choices": list(ARCHS)}, section=section).info(
            "families the engine does not map always go to the built-in; takes effect at the next generation"),
        "lycoris_hide_mismatched": shared.OptionInfo(
            False, "Hide networks made for another base model than the loaded one", section=section),
    }
    for key, info in opts.items():
        shared.opts.add_option(key, info)
    shared.opts.onchange("lycoris_cache_mb", HOST.refresh)
    shared.opts.onchange("lycoris_keep_backups", HOST.keep_backups_changed)
    shared.opts.onchange("lycoris_lowbit", HOST.lowbit_changed)


def _model_loaded(sd_model) -> None:
    HOST.model_loaded(sd_model)


def _unload() -> None:
    HOST.restore()


def register() -> None:
    """The host callbacks (called once by the scripts/ entry file)."""
    install_fallback_handler()   # `[lycoris] WARNING …` where the host has not set up logging
    script_callbacks.on_before_ui(before_ui)
    script_callbacks.on_before_component(before_component)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_model_loaded(_model_loaded)
    install_reload_guard()       # Forge: the old model is let go before a new one loads
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_ui_tabs(export_tab.on_ui_tabs)
    script_callbacks.on_script_unloaded(_unload)
