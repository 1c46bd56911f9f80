"""lycoris_app: the standalone host of the LyCORIS network loader (a Gradio app and a CLI).

A second host next to the WebUI glue in `scripts/`, and like it thin: every network decision (tags,
names, loading, per-step weights, restore) is the engine's (`lib_lycoris`); this package owns only what a
WebUI would otherwise provide:

- `model`     the embedded default model (tiny, real SD1 architecture, built from a fixed seed) and the
              offline loading of a user's single-file SD1.x/SD2.x/SDXL checkpoint
- `tokenizer` the CLIP tokenizer derived from open-clip-torch's BPE merges file (no hub)
- `examples`  example networks of several types for the default model (kohya keys, metadata, previews)
- `sampling`  the sampling loop: CFG over a diffusers scheduler, the Patcher moved at every step,
              text conditioning per te segment, optional hires pass; infotext
- `export`    the "Export LoRA" action: the prompt's tags as one LoRA in <data dir>/networks/exports/
- `ui`        the Gradio app (127.0.0.1 only); `__main__` the CLI (`serve`, `generate`, `networks`, `export`)

The engine never imports this package, gradio or diffusers (tests/test_boundary.py).
"""
from __future__ import annotations

__version__ = "0.1.0"
