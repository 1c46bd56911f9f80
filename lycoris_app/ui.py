"""The Gradio app: the parts of the WebUI this extension lives in, on 127.0.0.1 only.

txt2img controls (prompt and negative prompt with tags, steps, seed, CFG, size, sampler, hires pass,
merge/bypass), a Networks panel with one card per network file (preview, base-model badge, types,
trigger words; its button inserts the tag), and the outputs of Generate: the image (a PNG with the
infotext in its `parameters` chunk, saved under <data dir>/outputs), the infotext, every warning, and a
plot of each network's te/unet weight per step (steps for hold schedules, ramps for interp=linear, one line
per UNet block group where a tag has block weights; `GenResult.weight_rows`). An *Export LoRA* panel writes
the prompt's tags as one LoRA into <data dir>/networks/exports (`export.export_from_prompt`), shows the report
and the new card, and can put the export's tag in the prompt. All work is `Session.generate` and
`export_from_prompt`; this file only lays out.
"""
from __future__ import annotations

import html
import logging
import os
import re
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no telemetry calls from a local tool
import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from lib_lycoris.errors import LycorisError
from lib_lycoris.export import RANK_CHOICES

from .app import network_cards
from .export import (DTYPE_AUTO, DTYPE_CHOICES, MODE_DEFAULTS, error_html, export_from_prompt, exports_dir,
                     prompt_with, report_html)
from .sampling import SAMPLERS, GenParams, Session, save_png

log = logging.getLogger("lycoris_app")

HOST = "127.0.0.1"
CSS = """
.network-card { min-width: 150px !important; max-width: 190px; border: 1px solid var(--border-color-primary);
                border-radius: 8px; padding: 6px !important; }
.network-card img { width: 100%; aspect-ratio: 1; image-rendering: pixelated; border-radius: 4px; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 9px; margin-right: 4px;
         background: var(--color-accent-soft); }
.badge.base { background: #2563eb; color: white; }
.triggers { font-size: 12px; opacity: .8; }
#warnings textarea { color: #b45309; }
#result-image img { min-width: 256px; image-rendering: pixelated; }   /* 64×64 default images, shown 4× */
.export-error { color: #b91c1c; }
#export-result table { font-size: 12px; }
"""
# Series colors of the weight plot: Vega's 'tableau10' scheme (vega-scale, schemes.js), the Vega default.
PLOT_COLORS = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6",
               "#9d755d", "#bab0ac")


def _card_html(card: dict) -> str:
    img = (f'<img src="/gradio_api/file={html.escape(card["preview"])}" alt="preview of {html.escape(card["name"])}">'
           if card.get("preview") else '<div class="no-preview">no preview</div>')
    algos = "".join(f'<span class="badge">{html.escape(a)}</span>' for a in card.get("algos", {}))
    triggers = ", ".join(card.get("trigger_words") or []) or "no trigger words"
    error = f'<div class="error">{html.escape(card["error"])}</div>' if card.get("error") else ""
    return (f'{img}<div><span class="badge base">{html.escape(str(card.get("base_model", "?")).upper())}</span>'
            f'{algos}</div><div class="triggers" title="trigger words">{html.escape(triggers)}</div>{error}')


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _insert(prompt: str, tag: str) -> str:
    """Append the tag as the WebUI's card click does (one space apart; not twice)."""
    prompt = prompt or ""
    if tag in prompt:
        return prompt
    return f"{prompt.rstrip()} {tag}".strip()


def weight_frame(rows: list) -> pd.DataFrame:
    """The weight plot's data: `GenResult.weight_rows()` as (step, weight, series) columns."""
    return pd.DataFrame(rows or [(1, 0.0, "no networks")], columns=["step", "weight", "series"])


def series_colors(frame: pd.DataFrame) -> dict:
    """A color per series of the weight plot, in the order of the rows."""
    labels = dict.fromkeys(frame["series"])
    return {label: PLOT_COLORS[i % len(PLOT_COLORS)] for i, label in enumerate(labels)}


def build(session: Session) -> gr.Blocks:
    model = session.model
    outputs = Path(session.runtime.roots[0]).parent / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)

    def generate(prompt, negative, steps, seed, cfg, width, height, sampler, mode, hires, hr_scale, hr_steps,
                 denoise, progress=gr.Progress()):
        p = GenParams(prompt=prompt or "", negative=negative or "", steps=int(steps), seed=int(seed), cfg=float(cfg),
                      width=int(width), height=int(height), sampler=sampler, mode=mode,
                      hires_scale=float(hr_scale) if hires else 1.0, hires_steps=int(hr_steps), denoise=float(denoise))
        try:
            session.check(p)
        except ValueError as e:
            raise gr.Error(str(e))
        r = session.generate(p, lambda s, n, phase: progress((s, n), desc=phase))
        n = len(list(outputs.glob("*.png")))
        path = outputs / f"{n:05d}-{p.seed}.png"
        save_png(r.image, r.infotext, path)
        warnings = "\n".join(f"⚠ {w}" for w in r.warnings) or "no warnings"
        frame = weight_frame(r.weight_rows())
        return str(path), r.infotext, warnings, frame, series_colors(frame)

    def export(prompt_text, mode_name, number, dtype, file_name, step, total, overwrite, progress=gr.Progress()):
        """The Export LoRA button: (result HTML, the 'use it' button, the exported tag state)."""
        try:
            x = export_from_prompt(session, prompt_text or "", mode_name, number, file_name or "", dtype=dtype,
                                   step=int(step) if step else None, steps=int(total), overwrite=bool(overwrite),
                                   progress=lambda stage, done, n: progress((done, n), desc=stage))
        except LycorisError as e:
            log.warning("export refused: %s", e)
            return error_html(str(e)), gr.Button(visible=False), gr.skip()
        log.info("exported %s: %s", x.relname, x.report.summary())
        # The time makes every export a change of the state, which re-renders the network cards.
        return report_html(x), gr.Button(visible=True), {"tag": x.tag, "at": time.time()}

    with gr.Blocks(title="LyCORIS standalone", analytics_enabled=False) as demo:
        gr.Markdown(f"## LyCORIS networks: standalone host\nModel: **{model.name}** ({model.arch.upper()}, "
                    f"hash {model.short_hash})")
        if model.embedded:
            gr.Markdown("**This is the embedded default model: tiny, with random weights from a fixed seed. It draws "
                        "noise-like images.** Everything else is real: tags, schedules, block weights and the "
                        "example networks change those images exactly as they would change a real model's. "
                        "Start with `--ckpt your_model.safetensors` to use your own SD1.x/SD2.x/SDXL checkpoint.",
                        elem_id="default-model-note")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    value="a lighthouse at dusk <lora:inkwash_lora:0.8>" if model.embedded else "")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                with gr.Row():
                    steps = gr.Slider(1, 150, value=4 if model.embedded else 20, step=1, label="Steps", elem_id="steps")
                    sampler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Sampler", elem_id="sampler")
                    cfg = gr.Slider(1, 20, value=7, step=0.5, label="CFG scale", elem_id="cfg")
                with gr.Row():
                    size = model.default_size
                    width = gr.Slider(8, 2048, value=size, step=8, label="Width", elem_id="width")
                    height = gr.Slider(8, 2048, value=size, step=8, label="Height", elem_id="height")
                    seed = gr.Number(value=1, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("Hires. fix and network mode", open=False):
                    with gr.Row():
                        hires = gr.Checkbox(value=False, label="Hires. fix", elem_id="hires")
                        hr_scale = gr.Slider(1, 4, value=2, step=0.25, label="Upscale by")
                        hr_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0 = same)")
                        denoise = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Denoising strength")
                    mode = gr.Radio(["merge", "bypass"], value="merge", label="Network mode",
                                    info="merge writes the weights; bypass adds forward hooks")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Export LoRA", open=False, elem_id="export-panel"):
                    gr.Markdown("The networks of the prompt's tags, with their strengths and block weights, as "
                                f"one LoRA file in `{exports_dir(session)}`; it then shows in Networks as "
                                "`exports/<name>`. A tag whose weight changes per step is exported at the step "
                                "named below (of *Steps* above); hires weights are not used.")
                    with gr.Row():
                        ex_mode = gr.Radio(list(RANK_CHOICES), value="rank", label="Rank mode", elem_id="export-mode")
                        ex_value = gr.Number(value=MODE_DEFAULTS["rank"], elem_id="export-value",
                                             label="rank N / kept fraction F of ‖ΔW‖² / size in MB (10^6 bytes)")
                        ex_dtype = gr.Dropdown(list(DTYPE_CHOICES), value=DTYPE_AUTO, label="dtype",
                                               info="auto: fp16, fp32 for exact", elem_id="export-dtype")
                    with gr.Row():
                        ex_name = gr.Textbox(label="File name", placeholder="my_mix", elem_id="export-name")
                        ex_step = gr.Number(value=0, precision=0, minimum=0, elem_id="export-step",
                                            label="Step to export (for per-step weights; 0 = none)")
                        ex_over = gr.Checkbox(value=False, label="Overwrite an existing export",
                                              elem_id="export-overwrite")
                    ex_go = gr.Button("Export LoRA", elem_id="export-button")
                    ex_result = gr.HTML(elem_id="export-result")
                    ex_use = gr.Button("Use the exported tag in the prompt", visible=False, size="sm",
                                       elem_id="export-use")
                    exported = gr.State(None)
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="filepath", format="png", elem_id="result-image",
                                 interactive=False, height=320)
                info = gr.Textbox(label="Infotext", lines=4, elem_id="infotext", interactive=False)
                warn = gr.Textbox(label="Warnings", lines=2, elem_id="warnings", interactive=False)
        # No fixed height: Gradio counts the legend inside it and cuts the legend off.
        plot = gr.LinePlot(x="step", y="weight", color="series", elem_id="weights-plot",
                           label="Network weight per step (te / unet; unet in/mid/out: × block weights)",
                           x_axis_format="d", x_title="step")
        with gr.Accordion("Networks", open=True, elem_id="networks-panel"):
            refresh = gr.Button("Refresh", size="sm", elem_id="networks-refresh")

            @gr.render(triggers=[demo.load, refresh.click, exported.change])
            def cards():
                found = network_cards(session)
                if not found:
                    gr.Markdown(f"No network files in {session.runtime.roots[0]}.")
                with gr.Row():
                    for card in found:
                        with gr.Column(elem_classes=["network-card"], elem_id=f"card-{_slug(card['name'])}",
                                       min_width=150, scale=0):
                            gr.HTML(_card_html(card))
                            b = gr.Button(card["name"], size="sm", elem_classes=["card-insert"],
                                          elem_id=f"insert-{_slug(card['name'])}")
                            b.click(lambda p, tag=card["tag"]: _insert(p, tag), inputs=prompt, outputs=prompt)

        inputs = [prompt, negative, steps, seed, cfg, width, height, sampler, mode, hires, hr_scale, hr_steps, denoise]
        colors = gr.State({})
        # Gradio 6 rebuilds a plot's Vega spec (and with it the color domain, i.e. the legend) when a prop such as
        # `color_map` changes, not when only its data does: a new series would get no color and not be drawn.
        # Setting the colors in a second event, once the new data is on the page, redraws it with every series.
        go.click(generate, inputs=inputs, outputs=[image, info, warn, plot, colors], concurrency_limit=1).then(
            lambda c: gr.LinePlot(color_map=c), inputs=colors, outputs=plot)
        ex_mode.change(lambda m: gr.Number(value=MODE_DEFAULTS[m], interactive=m != "exact"), inputs=ex_mode,
                       outputs=ex_value)
        ex_go.click(export, inputs=[prompt, ex_mode, ex_value, ex_dtype, ex_name, ex_step, steps, ex_over],
                    outputs=[ex_result, ex_use, exported], concurrency_limit=1)
        ex_use.click(lambda p, state: prompt_with(p, state["tag"]) if state else p, inputs=[prompt, exported],
                     outputs=prompt)
    demo.lycoris_outputs = outputs
    return demo


def serve(session: Session, port: int = 7861, block: bool = True) -> gr.Blocks:
    demo = build(session)
    roots = [str(r) for r in session.runtime.roots] + [str(demo.lycoris_outputs)]
    demo.queue().launch(server_name=HOST, server_port=port, share=False, allowed_paths=roots, css=CSS,
                        prevent_thread_lock=not block, footer_links=[], quiet=False)
    return demo
