"""Reading network files: safetensors (header validated before any tensor is touched) and pickles
only through `torch.load(weights_only=True)` (a pickle that needs code is refused, never run), in torch's zip
format only, its directory checked first so that no record can make torch allocate more than the file holds.

Whatever the bytes, reading ends in a `RawFile` or a `NetworkFileError` (tests/test_fuzz.py mutates real
files to hold this: no other exception, no hang, no allocation sized by a number in the file).

`read_file(path) -> RawFile(tensors, metadata)`; `read_metadata(path)` reads the header alone (for the
Networks tab). `addnet_hash` is the hash A1111 shows in `Lora hashes` (sha256 of the bytes after the
safetensors header; the first 12 hex digits are the short hash).
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch

from .errors import NetworkFileError, UnsafeFileError

log = logging.getLogger("lycoris")

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
NETWORK_EXT = SAFETENSORS_EXT + PICKLE_EXT

# A header longer than this is not a network file (real headers are a few hundred KiB at most;
# safetensors itself refuses headers over 100 MB).
MAX_HEADER = 100_000_000

# safetensors dtype names -> bytes per element
_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# torch.save's format since torch 1.6: a zip archive (a local file header comes first).
_TORCH_ZIP_MAGIC = b"PK\x03\x04"
# Longest header value or key an error message quotes.
_MESSAGE_LIMIT = 200
_FLOAT_OK = {torch.float64, torch.float32, torch.float16, torch.bfloat16}

PathLike = Union[str, os.PathLike]


@dataclass
class RawFile:
    path: Path
    tensors: dict
    metadata: dict = field(default_factory=dict)
    size: int = 0
    mtime: float = 0.0


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """json `object_pairs_hook`: a dict, refusing a key given twice (Python keeps the last, safetensors may not)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _brief(value) -> str:
    """repr(value), cut to `_MESSAGE_LIMIT` characters (a header field can be megabytes long)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT - 3] + "..."


def _is_size(v) -> bool:
    """A shape entry or offset: a non-negative int within u64, as safetensors reads it (`true` is no number)."""
    return type(v) is int and 0 <= v < 2 ** 64


def _read_header(path: Path, f) -> tuple:
    """(header dict, data start offset); raises NetworkFileError on any inconsistency."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise NetworkFileError("file too short to be safetensors (truncated?)", file=str(path))
    (n,) = struct.unpack("<Q", raw)
    if n == 0 or n > MAX_HEADER or n > size - 8:
        raise NetworkFileError(f"safetensors header length {n} does not fit a {size}-byte file (truncated or "
                               "not safetensors)", file=str(path))
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise NetworkFileError("safetensors header names the same key twice (which one holds?)", file=str(path),
                               key=_brief(e.key)) from e
    except RecursionError as e:   # "[[[[...": the json module recurses once per level
        raise NetworkFileError("safetensors header is nested too deeply to be a header", file=str(path)) from e
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, and numbers longer than int() takes
        raise NetworkFileError(f"safetensors header is not valid JSON ({e})", file=str(path)) from e
    if not isinstance(header, dict):
        raise NetworkFileError("safetensors header is not a JSON object", file=str(path))
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise NetworkFileError("__metadata__ must map strings to strings", file=str(path), key=key)
            continue
        if not isinstance(info, dict):
            raise NetworkFileError("tensor entry is not an object", file=str(path), key=_brief(key))
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZE:
            raise NetworkFileError(f"unknown dtype {_brief(repr(dtype))}", file=str(path), key=_brief(key))
        if not (isinstance(shape, list) and all(_is_size(s) for s in shape)):
            raise NetworkFileError(f"bad shape {_brief(shape)}", file=str(path), key=_brief(key))
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_size(o) for o in offs)
                and offs[0] <= offs[1] <= data_len):
            raise NetworkFileError(f"data offsets {_brief(offs)} lie outside the {data_len}-byte data section "
                                   "(truncated file?)", file=str(path), key=_brief(key))
        numel = 0 if 0 in shape else 1
        for s in shape if numel else ():
            numel *= s
            if numel > data_len:   # too big already (and a product of a million huge numbers takes hours)
                break
        if offs[1] - offs[0] != numel * _DTYPE_SIZE[dtype]:
            size_text = f"{numel * _DTYPE_SIZE[dtype]} bytes" if numel <= data_len else "more than the file"
            raise NetworkFileError(f"header says {dtype}{_brief(shape)} ({size_text}) but gives "
                                   f"{offs[1] - offs[0]} bytes", file=str(path), key=_brief(key))
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise NetworkFileError(f"tensor data overlaps {ka!r}", file=str(path), key=kb)
    return header, 8 + n


def read_header(path: PathLike) -> dict:
    """The validated safetensors header: key -> {dtype, shape, data_offsets}, plus `__metadata__`."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_EXT:
        return {}
    try:
        with open(path, "rb") as f:
            header, _ = _read_header(path, f)
    except OSError as e:
        raise NetworkFileError(f"cannot read file: {e.strerror or e}", file=str(path)) from e
    return header


def read_metadata(path: PathLike) -> dict:
    """The `__metadata__` of a safetensors file (empty for pickles); header only, fast."""
    return dict(read_header(path).get("__metadata__", {}))


def _load_safetensors(path: Path) -> tuple:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    with open(path, "rb") as f:
        header, _ = _read_header(path, f)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise NetworkFileError(f"safetensors could not read the file ({e})", file=str(path)) from e
    return tensors, dict(header.get("__metadata__", {}))


def _first_line(e: BaseException, about: str = "") -> str:
    """The first line of `e`'s message that mentions `about` (any line if none does), or its type's name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if about.lower() in line.lower()), lines[0] if lines else type(e).__name__)


def _check_torch_zip(path: Path) -> None:
    """Refuse what would make torch.load allocate more than the file holds: the legacy (non-zip) format, and
    zip records whose directory claims more bytes than the file has (both found by tests/test_fuzz.py)."""
    with open(path, "rb") as f:
        if f.read(len(_TORCH_ZIP_MAGIC)) != _TORCH_ZIP_MAGIC:
            # The legacy format sizes each storage by a number in the pickle and allocates it before reading
            # the data, so a 100-byte file can ask for terabytes. torch wrote it only before 1.6 (2020), before
            # any LoRA for Stable Diffusion existed.
            raise NetworkFileError("not a torch zip file (the legacy format of torch < 1.6 is not read: "
                                   "re-save the file with torch.save, or convert it to safetensors)",
                                   file=str(path))
        size = os.fstat(f.fileno()).st_size
        # Read through a map: zipfile reads as many bytes as the directory says, and a file object allocates
        # them up front; a map returns only what the file has.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            try:
                with zipfile.ZipFile(view) as archive:   # type: ignore[arg-type]
                    records = archive.infolist()
            except (zipfile.BadZipFile, ValueError, OverflowError, struct.error, EOFError,
                    NotImplementedError) as e:
                raise NetworkFileError(f"not a readable torch file (damaged zip directory: {_first_line(e)})",
                                       file=str(path)) from e
    for r in records:
        # torch.save stores records uncompressed; torch's reader allocates the size the directory gives.
        if r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size \
                or r.header_offset + r.file_size > size:
            raise NetworkFileError(f"not a readable torch file (zip record claims {r.file_size} bytes at offset "
                                   f"{r.header_offset} of a {size}-byte file)", file=str(path), key=r.filename)


def _load_pickle(path: Path) -> tuple:
    _check_torch_zip(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError("pickle refused: it needs code to load, which is never run (convert it to "
                              f"safetensors with a tool you trust). Detail: {_first_line(e, 'global')}",
                              file=str(path)) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - see below
        # torch's weights-only unpickler and zip reader raise whatever corrupt bytes trip (RuntimeError,
        # EOFError, struct.error, IndexError, KeyError, UnicodeDecodeError, ... found by tests/test_fuzz.py);
        # no code ran, so each one means the same thing: not a readable torch file.
        raise NetworkFileError(f"not a readable torch file ({_first_line(e)})", file=str(path)) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise NetworkFileError(f"holds a {type(obj).__name__}, not a dict of tensors", file=str(path))
    tensors, metadata = {}, {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[str(k)] = v
        elif isinstance(v, (str, int, float)):
            metadata[str(k)] = str(v)
        else:
            raise NetworkFileError(f"entry is a {type(v).__name__}, not a tensor", file=str(path), key=str(k))
    return tensors, metadata


def read_file(path: PathLike) -> RawFile:
    """All tensors (on the CPU, as stored) and the metadata of one network file."""
    path = Path(path)
    ext = path.suffix.lower()
    try:
        st = path.stat()
    except OSError as e:
        raise NetworkFileError(f"cannot open file: {e.strerror or e}", file=str(path)) from e
    try:
        if ext in SAFETENSORS_EXT:
            tensors, metadata = _load_safetensors(path)
        elif ext in PICKLE_EXT:
            tensors, metadata = _load_pickle(path)
        else:
            raise NetworkFileError(f"unsupported file type {ext!r} (use one of {', '.join(NETWORK_EXT)})",
                                   file=str(path))
    except OSError as e:
        raise NetworkFileError(f"cannot read file: {e.strerror or e}", file=str(path)) from e
    for k, t in tensors.items():
        if t.is_complex():
            raise NetworkFileError(f"complex dtype {t.dtype} is not a network weight", file=str(path), key=k)
    if not tensors:
        raise NetworkFileError("file holds no tensors", file=str(path))
    return RawFile(path=path, tensors=tensors, metadata=metadata, size=st.st_size, mtime=st.st_mtime)


def addnet_hash(path: PathLike) -> str:
    """sha256 hex of a safetensors file's bytes after its header (A1111 `Lora hashes`); whole file else."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if path.suffix.lower() in SAFETENSORS_EXT:
                raw = f.read(8)
                size = os.fstat(f.fileno()).st_size
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 <= n <= size - 8:
                    raise NetworkFileError("cannot hash: the safetensors header length does not fit the file "
                                           "(truncated or not safetensors)", file=str(path))
                f.seek(8 + n)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise NetworkFileError(f"cannot read file: {e.strerror or e}", file=str(path)) from e
    return h.hexdigest()
