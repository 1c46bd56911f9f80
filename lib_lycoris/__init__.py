"""lib_lycoris: the host-free engine of the LyCORIS network loader.

Pure Python + torch + safetensors + numpy. It never imports the WebUI (`modules.*`, `backend.*`),
gradio or diffusers. Modules, one concern each:

- `errors`     typed errors carrying file and key
- `files`      reading network files (safetensors, safe pickles) and their metadata
- `keys`       file key styles (kohya, LyCORIS, diffusers, PEFT) -> one per-module form
- `modelmap`   model layouts (original LDM/SGM, diffusers) -> weight targets and their aliases
- `algorithms` one file per adapter type behind one validated registry
- `network`    a parsed network: per-module adapters, detection, base model, load report
- `tags`, `schedule`, `blocks`  prompt tags, per-step weights, block maps
- `patcher`    the one stateful object: applies networks to a live model, restores it bit-exactly
"""
from __future__ import annotations

__version__ = "0.1.0"
