"""The WebUI's "Export LoRA" action: the current prompt's networks (with their te/unet and block weights) as one
LoRA file in the networks folder, via `lib_lycoris.export.export_prompt`; an API route and a tab call it."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from modules import shared

from lib_lycoris.errors import LycorisError
from lib_lycoris.export import RANK_CHOICES, ExportReport, RankMode, export_prompt

from .host import HOST

log = logging.getLogger("lycoris")

MODES = RANK_CHOICES
# A file name, no folder: the export is written into the first networks folder.
_NAME = re.compile(r"^[\w][\w .()+-]{0,120}$")


def rank_mode(mode: str, value: Optional[float]) -> RankMode:
    """The engine's RankMode from the UI/API choice ('rank' N, 'fro' F, 'size-mb' M, 'exact')."""
    return RankMode.from_choice(mode, value)


def _checkpoint() -> Optional[str]:
    """The loaded checkpoint's file (base weights for DoRA/OFT/IA3/GLoRA inputs; never the patched live model)."""
    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    path = getattr(info, "filename", None)
    return path if path and Path(path).suffix.lower() == ".safetensors" and Path(path).is_file() else None


def export_current(prompt: str, mode: str, value: Optional[float], name: str, *, step: Optional[int] = None,
                   steps: Optional[int] = None) -> ExportReport:
    """Export the prompt's networks to `<first networks folder>/<name>.safetensors` (never overwrites).

    Raises LycorisError (a clear message) for a bad name, an existing file, or what the export refuses."""
    name = name.strip().removesuffix(".safetensors")
    if not _NAME.match(name):
        raise LycorisError(f"{name!r} is not a plain file name (letters, digits, space, . ( ) + - _)")
    roots = HOST.runtime.roots
    if not roots:
        raise LycorisError("no networks folder to write into")
    out = Path(roots[0]) / f"{name}.safetensors"
    if out.exists():
        raise LycorisError(f"{out.name} exists in the networks folder; choose another name")
    report = export_prompt(prompt, HOST.runtime.index, out, rank_mode(mode, value), step=step, total_steps=steps,
                           model=_checkpoint())
    HOST.refresh()   # the new file appears as a card
    log.info("exported %s: %s", out.name, report.summary())
    return report


def report_markdown(report: ExportReport) -> str:
    """Summary, notes and the layers that kept the least (for the tab)."""
    rows = "\n".join(f"| {u.name} | {u.written} | {u.rank} | {1 - u.rel_error ** 2:.4f} |" for u in report.worst())
    notes = "\n".join(f"- {line}" for line in report.lines[:20])
    return (f"**{Path(report.output).name}**: {report.summary()}\n\n{notes}\n\n"
            f"| layer (least kept first) | written | rank | energy kept |\n|---|---|---|---|\n{rows}")


def on_ui_tabs():
    """A *LoRA export* tab: prompt, rank mode, file name; the report below."""
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as tab:
        prompt = gr.Textbox(label="Prompt with the <lora:…> tags to export", lines=2)
        with gr.Row():
            mode = gr.Radio(list(MODES), value="rank", label="Rank mode")
            value = gr.Number(value=32, label="rank N / kept fraction F / size budget in MB (1 MB = 10^6 bytes)")
            name = gr.Textbox(label="File name (written into the networks folder)")
        button = gr.Button("Export LoRA", variant="primary")
        result = gr.Markdown()

        def run(prompt_text, mode_name, number, file_name):
            try:
                return report_markdown(export_current(prompt_text, mode_name, number, file_name))
            except LycorisError as e:
                return f"**Not exported:** {HOST.runtime.public_text(str(e))}"
        button.click(fn=run, inputs=[prompt, mode, value, name], outputs=[result])
    return [(tab, "LoRA export", "lycoris_export")]
