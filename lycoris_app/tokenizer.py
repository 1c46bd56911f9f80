"""The CLIP tokenizer, built offline from the BPE merges file that the `open-clip-torch` wheel ships.

OpenAI CLIP's tokenizer (openai/CLIP `clip/simple_tokenizer.py`, the same file as open_clip's
`bpe_simple_vocab_16e6.txt.gz`) derives its vocabulary from the merges alone:

    vocab = bytes_to_unicode() values (256) + the same + '</w>' (256)
            + ''.join(merge) for the first 49152 - 256 - 2 merges (48894) + <|startoftext|>, <|endoftext|>
          = 49408 tokens

which is exactly the `vocab.json` / `merges.txt` pair of the Hugging Face CLIP repositories. We read the
file from the installed wheel's RECORD (importlib.metadata, no `import open_clip`: that pulls torchvision),
else from a copy in the data dir, else `pip download open-clip-torch --no-deps` (PyPI only) into it.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import logging
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

log = logging.getLogger("lycoris_app")

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_DIST = "open-clip-torch"
OPEN_CLIP_PIN = "3.3.0"
# openai/CLIP simple_tokenizer.py: merges = merges[1:49152-256-2+1] (the first line is a version header).
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77   # CLIP context length


class TokenizerUnavailable(RuntimeError):
    """The BPE file is neither installed nor downloadable."""


def bytes_to_unicode() -> dict:
    """openai/CLIP simple_tokenizer.bytes_to_unicode: a reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _installed_bpe() -> Optional[Path]:
    try:
        files = importlib.metadata.files(OPEN_CLIP_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == BPE_NAME:
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _download_bpe(data_dir: Path) -> Path:
    """Extract the BPE file from the open-clip-torch wheel fetched from PyPI (no dependencies)."""
    wheels = data_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           f"{OPEN_CLIP_DIST}=={OPEN_CLIP_PIN}", "-d", str(wheels)]
    log.warning("CLIP tokenizer: %s not installed; fetching the wheel from PyPI: %s", OPEN_CLIP_DIST, " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("open_clip_torch-*.whl"))
    if r.returncode != 0 or not found:
        raise TokenizerUnavailable(
            f"cannot get the CLIP BPE file: install it with `pip install --no-deps {OPEN_CLIP_DIST}=={OPEN_CLIP_PIN}` "
            f"(pip download said: {r.stderr.strip()[-300:]})")
    target = data_dir / BPE_NAME
    with zipfile.ZipFile(found[-1]) as z:
        target.write_bytes(z.read(f"open_clip/{BPE_NAME}"))
    return target


def bpe_path(data_dir: Optional[Path] = None, download: bool = True) -> Path:
    """The BPE merges file: installed wheel, then `data_dir` copy, then (download=True) PyPI."""
    p = _installed_bpe()
    if p is not None:
        return p
    if data_dir is not None:
        cached = Path(data_dir) / BPE_NAME
        if cached.is_file():
            return cached
        if download:
            return _download_bpe(Path(data_dir))
    raise TokenizerUnavailable(f"{BPE_NAME} not found: `pip install --no-deps {OPEN_CLIP_DIST}=={OPEN_CLIP_PIN}`")


def vocab_and_merges(path: Path) -> tuple:
    """(vocab dict token -> id, merges list of pairs) exactly as openai/CLIP builds them."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerUnavailable(f"{path}: vocabulary of {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


@lru_cache(maxsize=4)
def _cached(path: str, pad: str):
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(Path(path))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=pad)
    tok.model_max_length = MAX_LENGTH
    return tok


def clip_tokenizer(data_dir: Optional[Path] = None, pad_token: str = EOS):
    """A transformers `CLIPTokenizer` (pad `<|endoftext|>` for SD1/SDXL te1; SD2 and SDXL te2 pad with '!')."""
    return _cached(str(bpe_path(data_dir)), pad_token)
