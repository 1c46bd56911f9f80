"""Fuzzing the network file reader (issue #14, Harden): Hypothesis mutates real network files.

Seeds are real files: networks of every adapter type made with `synth.module_tensors` (kohya key names, with
metadata), LoRA/LoHa/LoKr/full files written by the official `lycoris` package (`save_weights`, fp16, with
metadata) where it is installed, a diffusers/PEFT LoRA whose scale comes from `lora_adapter_metadata`, and
torch.save files (.pt, .ckpt with a `state_dict`). A mutation works on up to three levels:

- tensors: keys dropped, renamed to another suffix, moved to another module or added; shapes, dtypes and
  values changed; metadata set (PEFT configs with odd numbers and regular expressions included) — then saved
  as a valid file;
- structure: safetensors JSON fields (dtype, shape, data_offsets, `__metadata__`, entries added or deleted,
  duplicate keys, deep nesting, long integers); torch zip directory sizes and offsets, and bytes inside the
  archive's data.pkl (the archive rewritten around it);
- bytes: the 8-byte header length, single bytes, insertions, deletions and truncation.

Every outcome of `load_network` is a `Network` or a `LycorisError`, and so is every outcome of the
header-only readers (`read_metadata`, `base_model_of_file`) and of `addnet_hash`: never another exception,
a hang (`DEADLINE_S` per example; a hang in C code that the alarm cannot stop ends the run with tracebacks
after `HARD_DEADLINE_S`) or a giant allocation (the address space of the process may grow by at most
`MEMORY_HEADROOM` during one example; POSIX only).

CI runs `LYCORIS_FUZZ_EXAMPLES` examples (default 2000); the one-off long run in the #14 note used
`LYCORIS_FUZZ_EXAMPLES=100000`.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import io
import json
import logging
import os
import signal
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lib_lycoris.errors import LycorisError
from lib_lycoris.files import addnet_hash, read_metadata
from lib_lycoris.keys import SUFFIXES
from lib_lycoris.network import Network, base_model_of_file, load_network
from synth import module_tensors

try:
    import resource
except ImportError:  # Windows: no address-space limit, the deadline still holds
    resource = None

EXAMPLES = int(os.environ.get("LYCORIS_FUZZ_EXAMPLES", "2000"))
# Seconds one example may take. The slowest legitimate example (a 60 KB file on a loaded 2-core CI machine)
# takes well under 0.5 s; a hang is what this catches.
DEADLINE_S = 10.0
HARD_DEADLINE_S = 3 * DEADLINE_S
# How far the process's address space may grow during one example. Seed files are < 100 KB, so anything
# near this is an allocation sized by a number read from the file, not by its data.
MEMORY_HEADROOM = 1 << 30

# Small layer shapes with real SD1 kohya names: Linear, Conv 3x3, Conv 1x1, norm, text encoder Linear.
_LAYERS = (
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (32, 16)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", (8, 4, 3, 3)),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", (8, 4, 1, 1)),
    ("lora_unet_down_blocks_0_resnets_0_norm1", (8,)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (16, 16)),
)
_SYNTH_KINDS = ("lora", "locon-tucker", "loha", "lokr", "ia3", "glora", "full", "diag-oft", "boft", "lora-dora",
                "norm")
_METADATA = {"ss_output_name": "fuzz", "ss_base_model_version": "sd_v1", "ss_network_dim": "4",
             "ss_network_alpha": "2", "sshs_model_hash": "0123456789abcdef"}
_PEFT_META = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"proj_in": 2},
              "unet.alpha_pattern": {"to_k": 4}, "text_encoder.r": 4, "text_encoder.lora_alpha": 4}


def _synth(kind: str, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _LAYERS:
        tensors = module_tensors(kind, shape, g, has_bias=True)
        for suffix, t in (tensors or {}).items():
            out[f"{name}.{suffix}"] = t.to(dtype) if t.is_floating_point() else t
    return out


def _official() -> list:
    """(name, bytes) of files the official lycoris package's `save_weights` wrote, or [] without the package."""
    try:
        from lycoris import create_lycoris
    except ImportError:
        return []
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 32)
            self.conv = nn.Conv2d(4, 8, 3)

    g = torch.Generator().manual_seed(1)
    out = []
    with tempfile.TemporaryDirectory() as d, torch.random.fork_rng():   # (module init draws from the global RNG)
        for algo in ("lora", "loha", "lokr", "full"):
            model = Tiny()
            net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo)
            net.apply_to()   # registers the modules as children (what save_weights reads) ...
            net.restore()    # ... and puts the tiny model's forwards back
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            path = os.path.join(d, f"{algo}.safetensors")
            net.save_weights(path, torch.float16, {"ss_network_module": "lycoris.kohya", **_METADATA})
            raw = Path(path).read_bytes()
            if len(st_load(raw)):
                out.append((f"official-{algo}", raw))
    return out


def _peft() -> dict:
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": rnd(4, 4, 1, 1),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": rnd(8, 4, 1, 1),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": rnd(4, 16),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": rnd(32, 4),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": rnd(4, 16),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": rnd(16, 4)}


@functools.lru_cache(maxsize=None)
def seeds() -> tuple:
    """(name, file suffix, bytes) of every seed file; each one loads as a network unmutated."""
    out = []
    for i, kind in enumerate(_SYNTH_KINDS):
        out.append((kind, ".safetensors", st_save(_synth(kind, torch.float32, i), _METADATA)))
    out.append(("lora-fp16", ".safetensors", st_save(_synth("lora", torch.float16, 20), _METADATA)))
    out.append(("loha-bf16", ".safetensors", st_save(_synth("loha", torch.bfloat16, 21), {})))
    out.append(("peft", ".safetensors",
                st_save(_peft(), {"lora_adapter_metadata": json.dumps(_PEFT_META), "format": "pt"})))
    out += [(name, ".safetensors", raw) for name, raw in _official()]
    out.append(("pickle", ".pt", _torch_save({**_synth("lora", torch.float32, 30), "ss_output_name": "fuzz",
                                              "epoch": 3})))
    out.append(("pickle-loha", ".ckpt", _torch_save({"state_dict": _synth("loha", torch.float16, 31)})))
    return tuple(out)


def _torch_save(obj: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- the guard ---------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the deadline alarm (a BaseException, so no `except Exception` in the code under test eats it)."""


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Run the body under a deadline (SIGALRM; `HARD_DEADLINE_S` ends the process) and an address-space limit
    (RLIMIT_AS), where POSIX has them."""
    limit = None
    if resource is not None and os.path.exists("/proc/self/statm"):
        limit = resource.getrlimit(resource.RLIMIT_AS)
        soft = _address_space() + MEMORY_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (soft if limit[1] == resource.RLIM_INFINITY else min(soft, limit[1]),
                                                limit[1]))
    # A hang inside C code (a regular expression backtracking, a parser loop) never sees the alarm: then the
    # whole run stops with every thread's traceback, which names the place.
    faulthandler.dump_traceback_later(HARD_DEADLINE_S, exit=True)
    alarm = hasattr(signal, "setitimer")
    if alarm:
        def on_alarm(signum, frame):
            raise Hang(f"example ran past {DEADLINE_S} s")
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, limit)


def _allocation_failed(e: BaseException) -> bool:
    """Whether `e` wraps an allocation the address-space limit refused (torch says "can't allocate")."""
    while e is not None:
        if isinstance(e, MemoryError) or "can't allocate" in str(e) or "not enough memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def outcome(path: Path) -> str:
    """'loaded' or 'refused'; any exception but a LycorisError propagates (and fails the example)."""
    with guarded():
        try:
            net = load_network(path)
        except LycorisError as e:
            assert str(e) and e.file, e   # the error names the file
            assert not _allocation_failed(e), f"a giant allocation was refused, not prevented: {e}"
            result = "refused"
        else:
            assert isinstance(net, Network) and net.modules
            result = "loaded"
        for reader in (read_metadata, base_model_of_file, addnet_hash):
            try:
                reader(path)
            except LycorisError:
                pass
    return result


# --- mutations ---------------------------------------------------------------------------------------------

_INTERESTING_INTS = (0, 1, -1, 2, 7, 8, 255, 256, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 63 - 1, 2 ** 63,
                     2 ** 64 - 1, 2 ** 64, 10 ** 30, -(2 ** 63))
ints = st.sampled_from(_INTERESTING_INTS) | st.integers()
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)
shapes = st.lists(st.sampled_from((0, 1, 2, 3, 4, 8, 16, 32, 36)) | st.integers(0, 40), max_size=5)
_TORCH_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
                 torch.complex64)
# Largest tensor a shape mutation makes (keeps the mutants as small as the seeds).
_MAX_NUMEL = 4096
_SPECIALS = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e38, 65504.0, 1e-45)
_META_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "ss_v2", "ss_output_name",
              "sshs_model_hash", "lora_adapter_metadata", "peft_config", "ss_network_args")
# rank_pattern / alpha_pattern keys: module names, regular expressions, broken ones and ones that backtrack
# for hours on a module path (nested or many quantifiers).
_PATTERN_KEYS = ("proj_in", "to_k", "q_proj", "down_blocks.0.attentions.0.proj_in", ".*", "attn2\\.to_[kv]", "(",
                 "[a-", "", "a|", "(.*.*.*.*.*.*.*.*.*.*)*x", "(a|a)*$", ".*.*.*.*.*.*.*.*.*.*.*.*.*.*x")
_PEFT_KEYS = ("r", "lora_alpha", "alpha", "rank_pattern", "alpha_pattern", "use_rslora")
peft_configs = st.dictionaries(
    st.sampled_from(_PEFT_KEYS) | st.builds(lambda p, k: f"{p}.{k}", st.sampled_from(
        ("unet", "transformer", "text_encoder", "text_encoder_2")), st.sampled_from(_PEFT_KEYS)),
    json_values | st.dictionaries(st.sampled_from(_PATTERN_KEYS) | st.text(max_size=6), json_values, max_size=3),
    max_size=6)
meta_values = (st.text(max_size=30) | st.sampled_from(("sdxl_base_v1-0", "sd_v2", "flux1", "sd3", "True"))
               | st.builds(lambda v: json.dumps(v, allow_nan=True), peft_configs | json_values))

tensor_ops = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 999)),
    st.tuples(st.just("rename"), st.integers(0, 999), st.sampled_from(sorted(SUFFIXES)) | st.text(max_size=8)),
    st.tuples(st.just("move"), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.just("shape"), st.integers(0, 999), shapes),
    st.tuples(st.just("dtype"), st.integers(0, 999), st.sampled_from(_TORCH_DTYPES)),
    st.tuples(st.just("value"), st.integers(0, 999), st.sampled_from(_SPECIALS)),
    st.tuples(st.just("copy"), st.integers(0, 999), st.integers(0, 999), st.sampled_from(sorted(SUFFIXES))),
    st.tuples(st.just("key"), st.integers(0, 999), st.text(max_size=40)),
    st.tuples(st.just("meta"), st.sampled_from(_META_KEYS) | st.text(max_size=8), meta_values),
    st.tuples(st.just("unmeta"), st.sampled_from(_META_KEYS)),
    st.just(("unmeta", "ss_base_model_version")),   # base model told by shapes: every adapter's sizes are read
    st.tuples(st.just("peft"), st.sampled_from(("lora_adapter_metadata", "peft_config")), peft_configs),
)
header_ops = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 999), st.sampled_from(("dtype", "shape", "data_offsets", "x")),
              json_values | shapes | st.sampled_from(("F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "C64",
                                                      "F4", "f32", ""))),
    st.tuples(st.just("unfield"), st.integers(0, 999), st.sampled_from(("dtype", "shape", "data_offsets"))),
    st.tuples(st.just("offsets"), st.integers(0, 999), ints, ints),
    st.tuples(st.just("shift"), st.integers(0, 999), st.integers(-64, 64)),
    st.tuples(st.just("same_offsets"), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.just("unentry"), st.integers(0, 999)),
    st.tuples(st.just("entry"), st.text(max_size=20), json_values),
    st.tuples(st.just("metadata"), json_values),
    # raw JSON text in place of a field: deep nesting, a number longer than Python parses, a long string
    st.tuples(st.just("raw"), st.integers(0, 999), st.sampled_from(("shape", "data_offsets", "dtype")),
              st.sampled_from(("deep", "bigint", "longstr", "float", "dupkey")), st.integers(1, 200_000)),
)
byte_ops = st.one_of(
    st.tuples(st.just("length"), ints.map(lambda v: v % 2 ** 64)),
    st.tuples(st.just("length+"), st.integers(-16, 16)),
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("head_byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)

# Zip record signatures and the offsets of their 4-byte size/offset fields: local file header (compressed and
# uncompressed size), central directory entry (sizes, local header offset), end of central directory (size and
# offset of the central directory).
_ZIP_FIELDS = ((b"PK\x03\x04", (18, 22)), (b"PK\x01\x02", (20, 24, 42)), (b"PK\x05\x06", (12, 16)))
zip_ops = st.one_of(
    st.tuples(st.just("zip"), st.integers(0, 2), st.integers(0, 99), st.integers(0, 2), ints),
    st.tuples(st.just("pkl"), byte_ops),
)


def _pick(items: list, i: int):
    return items[i % len(items)] if items else None


def _module_and_suffix(key: str) -> tuple:
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return key, ""


def apply_tensor_op(tensors: dict, metadata: dict, op: tuple) -> None:
    kind, keys = op[0], sorted(tensors)
    key = _pick(keys, op[1]) if kind not in ("meta", "unmeta", "peft") else None
    if kind == "meta":
        metadata[op[1]] = op[2]
    elif kind == "unmeta":
        metadata.pop(op[1], None)
    elif kind == "peft":
        metadata[op[1]] = json.dumps(op[2], allow_nan=True)
    elif key is None:
        return
    elif kind == "drop":
        del tensors[key]
    elif kind == "rename":
        module, _ = _module_and_suffix(key)
        tensors[f"{module}.{op[2]}"] = tensors.pop(key)
    elif kind == "move":
        _, suffix = _module_and_suffix(key)
        other, _ = _module_and_suffix(_pick(keys, op[2]))
        tensors[f"{other}.{suffix}"] = tensors.pop(key)
    elif kind == "shape":
        t = tensors[key]
        n = 1
        for s in op[2]:
            n *= s
        if n > _MAX_NUMEL:
            return
        tensors[key] = (torch.arange(n, dtype=torch.float32) * 0.01).reshape(op[2]).to(t.dtype)
    elif kind == "dtype":
        tensors[key] = tensors[key].to(op[2])
    elif kind == "value":
        t = tensors[key]
        if t.numel() and t.is_floating_point():
            t = t.clone()
            t.view(-1)[0] = op[2]
            tensors[key] = t
    elif kind == "copy":
        module, _ = _module_and_suffix(_pick(keys, op[2]))
        tensors[f"{module}.{op[3]}"] = tensors[key].clone()
    elif kind == "key":
        tensors[op[2]] = tensors.pop(key)


def _split(raw: bytes) -> tuple:
    """(header dict, data bytes) of a well-formed safetensors file, or None."""
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, raw[8 + n:]) if isinstance(header, dict) else None


_HOLE = "\x00hole\x00"


def _raw_snippet(kind: str, size: int) -> str:
    if kind == "deep":
        return "[" * size + "]" * size
    if kind == "bigint":
        return "9" * size
    if kind == "longstr":
        return json.dumps("x" * size)
    if kind == "float":
        return "1e" + str(size)
    return "[1]"


def apply_header_op(raw: bytes, op: tuple) -> bytes:
    split = _split(raw)
    if split is None:
        return raw
    header, data = split
    entries = sorted(k for k in header if k != "__metadata__")
    kind = op[0]
    key = _pick(entries, op[1]) if kind not in ("entry", "metadata") else None
    info = header.get(key) if key is not None else None
    extra = None
    if kind == "field" and isinstance(info, dict):
        info[op[2]] = op[3]
    elif kind == "unfield" and isinstance(info, dict):
        info.pop(op[2], None)
    elif kind == "offsets" and isinstance(info, dict):
        info["data_offsets"] = [op[2], op[3]]
    elif kind == "shift" and isinstance(info, dict) and isinstance(info.get("data_offsets"), list):
        info["data_offsets"] = [o + op[2] if isinstance(o, int) else o for o in info["data_offsets"]]
    elif kind == "same_offsets" and isinstance(info, dict):
        other = header.get(_pick(entries, op[2]))
        if isinstance(other, dict):
            info["data_offsets"] = other.get("data_offsets")
    elif kind == "unentry" and key is not None:
        del header[key]
    elif kind == "entry":
        header[op[1]] = op[2]
    elif kind == "metadata":
        header["__metadata__"] = op[1]
    elif kind == "raw" and isinstance(info, dict):
        info[op[2]] = _HOLE
        extra = _raw_snippet(op[3], op[4])
    text = json.dumps(header, allow_nan=True)
    if extra is not None:
        hole = json.dumps(_HOLE)
        if op[3] == "dupkey":   # the same key twice in one object
            text = text.replace(hole, json.dumps(info.get("shape", [1])) + f', "{op[2]}": [0]', 1)
        else:
            text = text.replace(hole, extra, 1)
    body = text.encode("utf-8", "surrogatepass")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def apply_byte_op(raw: bytes, op: tuple) -> bytes:
    kind = op[0]
    at = lambda f: min(int(f * len(raw)), max(len(raw) - 1, 0))  # noqa: E731
    if kind == "length":
        return struct.pack("<Q", op[1]) + raw[8:]
    if kind == "length+" and len(raw) >= 8:
        (n,) = struct.unpack("<Q", raw[:8])
        return struct.pack("<Q", (n + op[1]) % 2 ** 64) + raw[8:]
    if kind == "byte" and raw:
        i = at(op[1])
        return raw[:i] + bytes([op[2]]) + raw[i + 1:]
    if kind == "head_byte" and len(raw) > 8:
        (n,) = struct.unpack("<Q", raw[:8])
        i = 8 + int(op[1] * min(n, len(raw) - 8)) if n else 0
        i = min(i, len(raw) - 1)
        return raw[:i] + bytes([op[2]]) + raw[i + 1:]
    if kind == "truncate":
        return raw[: int(op[1] * len(raw))]
    if kind == "insert":
        i = at(op[1])
        return raw[:i] + op[2] + raw[i:]
    if kind == "delete":
        i = at(op[1])
        return raw[:i] + raw[i + op[2]:]
    if kind == "append":
        return raw + op[1]
    return raw


class Mutant(tuple):
    """(suffix, bytes, steps); printed as its steps (the bytes would fill the screen)."""

    def __repr__(self) -> str:
        return f"Mutant({self[2]}, {len(self[1])} bytes)"


def apply_zip_op(raw: bytes, op: tuple) -> bytes:
    """A size or offset field of a zip record set to a value (torch's reader checks no CRC, so it trusts them)."""
    sig, fields = _ZIP_FIELDS[op[1] % len(_ZIP_FIELDS)]
    places = [i for i in range(len(raw)) if raw.startswith(sig, i)]
    if not places:
        return raw
    at = places[op[2] % len(places)] + fields[op[3] % len(fields)]
    return raw[:at] + struct.pack("<I", op[4] % 2 ** 32) + raw[at + 4:]


def apply_pickle_op(raw: bytes, op: tuple) -> bytes:
    """A byte op inside the archive's data.pkl, the archive rewritten around it (valid zip, corrupt pickle)."""
    try:
        src = zipfile.ZipFile(io.BytesIO(raw))
        records = {i.filename: src.read(i) for i in src.infolist()}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return raw
    name = next((n for n in records if n.endswith("data.pkl")), None)
    if name is None:
        return raw
    records[name] = apply_byte_op(records[name], op[1])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for n, data in records.items():
            dst.writestr(n, data)
    return out.getvalue()


def _decode(suffix: str, raw: bytes) -> tuple:
    """(tensors, metadata) of a seed file."""
    if suffix == ".safetensors":
        return dict(st_load(raw)), dict(_split(raw)[0].get("__metadata__", {}))
    obj = torch.load(io.BytesIO(raw), weights_only=True)
    obj = obj.get("state_dict", obj)
    return ({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)},
            {k: str(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)})


@st.composite
def mutated_files(draw) -> Mutant:
    """One mutated seed file."""
    name, suffix, raw = draw(st.sampled_from(seeds()))
    steps = []
    t_ops = draw(st.lists(tensor_ops, max_size=3))
    if t_ops:
        tensors, metadata = _decode(suffix, raw)
        for op in t_ops:
            apply_tensor_op(tensors, metadata, op)
        raw = st_save(tensors, metadata) if suffix == ".safetensors" else _torch_save({**metadata, **tensors})
        steps += t_ops
    if suffix == ".safetensors":
        for op in draw(st.lists(header_ops, max_size=3)):
            raw = apply_header_op(raw, op)
            steps.append(op[:3] + (f"{op[3]}x{op[4]}",) if op[0] == "raw" else op)
    else:
        for op in draw(st.lists(zip_ops, max_size=3)):
            raw = apply_zip_op(raw, op) if op[0] == "zip" else apply_pickle_op(raw, op)
            steps.append(op)
    for op in draw(st.lists(byte_ops, max_size=3)):
        raw = apply_byte_op(raw, op)
        steps.append(op)
    return Mutant((suffix, raw, f"{name}: {steps}"))


@pytest.fixture(scope="module")
def fuzz_dir():
    logger = logging.getLogger("lycoris")
    level = logger.level
    logger.setLevel(logging.ERROR)   # PEFT-config warnings, one per example
    try:
        with tempfile.TemporaryDirectory(prefix="lycoris-fuzz-") as d:
            yield Path(d)
    finally:
        logger.setLevel(level)


def test_seeds_load(fuzz_dir: Path) -> None:
    """Non-vacuity: every seed loads unmutated, so a refusal of a mutant is the mutation's doing."""
    names = []
    for name, suffix, raw in seeds():
        path = fuzz_dir / f"seed{suffix}"
        path.write_bytes(raw)
        assert outcome(path) == "loaded", name
        names.append(name)
    assert {"lora", "loha", "lokr", "full", "peft", "pickle", "official-lokr"} <= set(names)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning",   # a mutated data.pkl header
                            "ignore:Casting complex values:UserWarning")     # a complex tensor made real
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
@given(case=mutated_files())
def test_mutated_files_load_or_raise_our_error(fuzz_dir: Path, case: tuple) -> None:
    suffix, raw, steps = case
    path = fuzz_dir / f"mutant{suffix}"
    path.write_bytes(raw)
    try:
        outcome(path)
    except Hang:
        pytest.fail(f"hang: {steps}")
    except (LycorisError, AssertionError):
        raise
    except Exception as e:   # the finding: anything but our own error type
        raise AssertionError(f"{type(e).__name__}: {e} after {steps}") from e


if __name__ == "__main__":   # the long run: LYCORIS_FUZZ_EXAMPLES=100000 python tests/test_fuzz.py
    sys.exit(pytest.main([__file__, "-q", "-x"]))
