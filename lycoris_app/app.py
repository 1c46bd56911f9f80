"""What both front ends (CLI and Gradio) start from: the data dir, the model, the example networks.

Data dir (default `~/.cache/lycoris_app`, or `--data-dir`, or $LYCORIS_APP_DATA):

    networks/                 network files (+ <name>.preview.png), the tags' namespace
    networks/exports/         what Export LoRA writes (`export.py`): listed and tagged as exports/<name>
    bpe_simple_vocab_16e6.txt.gz   the CLIP BPE file, when open-clip-torch is not installed

With no checkpoint the embedded default model is built (fixed seed) and the example networks are
written into `networks/` if missing, with previews. A user checkpoint leaves the folder as it is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lib_lycoris.errors import LycorisError
from lib_lycoris.inspect import describe

from .examples import Example, ensure_examples
from .model import Model, build_default, load_checkpoint
from .sampling import GenParams, Session

log = logging.getLogger("lycoris_app")

DEFAULT_DATA_DIR = Path("~/.cache/lycoris_app")
# The default model's ops are tiny: extra threads only add sync cost (on a busy 2-core runner one
# thread is ~20x faster than torch's default), and one thread makes its bits independent of the core count.
DEFAULT_MODEL_THREADS = 1


@dataclass
class AppConfig:
    data_dir: Path
    checkpoint: Optional[Path] = None
    networks: Optional[list] = None      # extra network folders (searched after the data dir's)
    threads: Optional[int] = None
    device: str = "cpu"
    v_prediction: Optional[bool] = None

    @property
    def networks_dir(self) -> Path:
        return self.data_dir / "networks"


def data_dir(arg: Optional[str]) -> Path:
    return Path(arg or os.environ.get("LYCORIS_APP_DATA") or DEFAULT_DATA_DIR).expanduser()


def open_session(cfg: AppConfig) -> Session:
    """Load the model (default or checkpoint), make the example networks if needed, return a Session."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cfg.networks_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or (DEFAULT_MODEL_THREADS if cfg.checkpoint is None else None)
    if threads:
        torch.set_num_threads(threads)
    if cfg.checkpoint is None:
        model: Model = build_default(cfg.data_dir)
    else:
        model = load_checkpoint(cfg.checkpoint, cfg.data_dir, device=cfg.device,
                                dtype=torch.float16 if cfg.device != "cpu" else torch.float32,
                                v_prediction=cfg.v_prediction)
    session = Session(model, [cfg.networks_dir] + [Path(p) for p in (cfg.networks or [])])
    if model.embedded:
        def render(ex: Example):
            return session.generate(GenParams(f"{ex.trigger} <lora:{ex.name}:1>", steps=4, seed=1)).image
        ensure_examples(cfg.networks_dir, session.patcher.model, render)
        session.runtime.refresh()
    return session


def network_cards(session) -> list:
    """One dict per network file: name, tag, base model, types, trigger words, preview path, problems."""
    cards = []
    session.runtime.refresh()
    for e in sorted(session.runtime.index.entries(), key=lambda e: e.relname.lower()):
        card = {"name": e.relname, "file": str(e.path), "tag": f"<lora:{e.relname}:1>", "alias": e.alias}
        preview = next((p for p in (e.path.with_suffix(".preview.png"), e.path.with_suffix(".png")) if p.is_file()), None)
        card["preview"] = str(preview) if preview else None
        try:
            d = describe(session.runtime.cache.get(e.path, e.stem))
            card.update(base_model=d["base_model"], algos=d["algos"], trigger_words=d["trigger_words"],
                        training_tags=[t for t, _ in d["training_tags"][:8]], modules=d["modules"], error=None)
        except LycorisError as err:
            log.warning("%s: %s", e.path, err)
            card.update(base_model="?", algos={}, trigger_words=[], training_tags=[], modules=0, error=str(err))
        cards.append(card)
    return cards
