"""Bake networks into a checkpoint state dict (the `merge` command; later the export/bake features).

Each touched weight becomes W' = W + Σ_i (W'_i(m_i) − W) (see `compose`), computed in float32 on the
chosen device by the Patcher's own `write_weight` (so a merge and a live patch give the same bits),
written back in the checkpoint's dtype. Works on either layout (see `modelmap`).

Also owns what a merge decides beyond the math: strictness (`bind_networks`: by default a module the model
lacks or whose delta does not fit refuses the whole merge with a `PartialMergeError` listing every such
module; `strict=False` merges the rest and logs one warning per module left out, the bind report staying
the source of truth), reading a checkpoint with its header validated first (`checkpoint_shapes`,
`read_checkpoint`) and writing one atomically (`CheckpointWriter`: a temp file beside the output, renamed
at the end, so a failure leaves nothing behind).
"""
from __future__ import annotations

import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Optional, Sequence, Type

import torch
from safetensors import SafetensorError

from .algorithms import Adapter
from .algorithms.full import Full
from .algorithms.lora import LoRA
from .compose import merged_bias
from .errors import CheckpointFileError, NetworkFileError, PartialMergeError
from .files import PathLike, read_header
from .modelmap import ModelMap
from .network import Binding, LoadReport, bind
from .patcher import write_weight

log = logging.getLogger("lycoris")

# How many modules a refusal names before it says "… and N more" (a network for the wrong base model can
# miss hundreds; the first few tell the story).
MAX_LISTED = 20


# --------------------------------------------------------------------------------------------------
# What would not be merged

@dataclass(frozen=True)
class MergeProblem:
    """One module of one network that a merge would leave out."""

    file: str       # the network file
    module: str     # 'component:body', as in the bind report
    kind: str       # 'missing' (the model lacks it) | 'misfit' (matched, but of the wrong shape)
    reason: str     # with the delta's and the weight's shapes for a misfit

    def __str__(self) -> str:
        return f"{self.file}: {self.module}: {self.reason}"


def _delta_shape(adapter: Adapter, weight_shape: tuple) -> str:
    """The shape of the ΔW `adapter` adds, as text (exact for LoRA and full diffs; else out × rest, laid
    out like the weight where the sizes allow; the factor shapes where the type fixes no output size)."""
    if isinstance(adapter, Full) and adapter.diff is not None:
        return str(tuple(adapter.diff.shape))
    if isinstance(adapter, LoRA):
        return str((adapter.out_features(), adapter.down.shape[1]) + adapter.kernel())
    out = adapter.out_features()
    try:
        numel = adapter.numel()
    except NotImplementedError:   # rotation types: only the number of rows is fixed
        numel = -1
    if out > 0 and numel > 0 and numel % out == 0:
        rest = numel // out
        kernel = tuple(weight_shape[2:])
        if rest == 1:
            return str((out,))
        if kernel and rest % math.prod(kernel) == 0:
            return str((out, rest // math.prod(kernel)) + kernel)
        return str((out, rest))
    if out > 0:
        return f"({out}, …)"
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in adapter.tensors().items())


def merge_problems(binding: Binding, model: ModelMap) -> list:
    """Every module of `binding`'s report that a merge would leave out, as `MergeProblem`s: the report's
    unmatched and skipped entries, a shape misfit reworded to give the delta's shape next to the weight's."""
    file = str(binding.network.path)
    report: LoadReport = binding.report
    problems = [MergeProblem(file, label, "missing", reason) for label, reason in report.unmatched]
    for label, reason in report.skipped:
        comp, _, body = label.partition(":")
        mod = binding.network.modules.get((comp, body))
        t = model.lookup(comp, body)
        if mod is not None and t is not None and not mod.adapter.fits(t.shape):
            weight = t.weight if t.rows is None else f"{t.weight}[{t.rows[0]}:{t.rows[1]}]"
            reason = (f"{mod.algo} delta {_delta_shape(mod.adapter, t.shape)} does not fit weight {weight} "
                      f"{tuple(t.shape)}")
        problems.append(MergeProblem(file, label, "misfit", reason))
    return problems


def refusal_message(problems: Sequence[MergeProblem]) -> str:
    """The text of a strict refusal: counts, then one line per module (up to MAX_LISTED)."""
    missing = sum(p.kind == "missing" for p in problems)
    lines = [f"{len(problems)} module(s) would not be merged ({missing} not in the model, "
             f"{len(problems) - missing} of the wrong shape):"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  … and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def bind_networks(model: ModelMap, networks: Sequence[tuple], *, strict: bool = True) -> list:
    """Bind each (Network, request) pair to `model`; returns the Bindings.

    strict: raise PartialMergeError (before anything is computed) when any module is missing from the model
    or does not fit it; otherwise log one WARNING per such module and go on. A network of which nothing
    fits raises ModelMismatchError either way (see `network.bind`).
    """
    bindings = [bind(network, model) for network, _ in networks]
    problems = [p for b in bindings for p in merge_problems(b, model)]
    if problems and strict:
        raise PartialMergeError(refusal_message(problems),
                                problems=[(p.file, p.module, p.reason) for p in problems])
    for p in problems:
        log.warning("not merged: %s", p)
    return bindings


def merge_state_dict(sd: dict, networks: Sequence[tuple], device: Optional[str] = None,
                     progress: Optional[Callable[[int, int], None]] = None, *, strict: bool = True) -> list:
    """Merge (Network, request) pairs into `sd` in place; returns one LoadReport per network.

    request: anything with `weight(component, block, step, total)` (e.g. `patcher.Strength`); it is
    evaluated at step 1 of 1 with block None (no block weights in a plain merge).
    strict: see `bind_networks`; a refusal leaves `sd` untouched.
    """
    mm = ModelMap.from_state_dict(sd)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    per_weight: dict = {}
    bindings = bind_networks(mm, networks, strict=strict)
    for b, (_, request) in zip(bindings, networks):
        for target, mod in b.pairs:
            m = float(request.weight(target.component, None, 1, 1))
            if m == 0.0:
                continue
            per_weight.setdefault(target.weight, []).append(
                (target, mod.contribution(request.dyn, target.placement()), m))
    total = len(per_weight)
    for i, (name, items) in enumerate(per_weight.items()):
        w = sd[name].to(dev, copy=True)
        base = w.clone()
        bias_name = items[0][0].bias
        sel = [(c, m) for _, c, m in items]     # each placed in its rows of the whole weight (`compose`)
        write_weight(w, base, [(c, m, c.low_rank(dev)) for c, m in sel])
        new_b = None
        if bias_name is not None and any(c.bias_delta is not None for c, _ in sel):
            new_b = merged_bias(sd[bias_name].to(dev), sel).to(sd[bias_name].dtype)
        sd[name] = w.cpu()
        if new_b is not None:
            sd[bias_name] = new_b.cpu()
        if progress:
            progress(i + 1, total)
    return [b.report for b in bindings]


# --------------------------------------------------------------------------------------------------
# Reading and writing checkpoints

def _detail(e: BaseException) -> str:
    """One line saying what an OS or safetensors error was about (no traceback, no multi-line dump)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.splitlines()[0] if text else type(e).__name__


def checkpoint_shapes(path: PathLike) -> dict:
    """Tensor name -> shape of a .safetensors checkpoint, from its header alone, validated as `files`
    validates network files (lengths, offsets, dtypes). Raises CheckpointFileError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFileError("model checkpoint not found", file=str(path))
    if path.is_dir():
        raise CheckpointFileError("model checkpoint is a folder, not a single .safetensors file", file=str(path))
    if path.suffix.lower() != ".safetensors":
        raise CheckpointFileError("model checkpoint must be a .safetensors state dict (pickles are not read)",
                                  file=str(path))
    try:
        header = read_header(path)
    except NetworkFileError as e:
        raise CheckpointFileError(f"model checkpoint is unreadable: {e.message}", file=str(path), key=e.key) from e
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if not shapes:
        raise CheckpointFileError("model checkpoint holds no tensors", file=str(path))
    return shapes


def read_checkpoint(path: PathLike) -> tuple:
    """(state dict on the CPU, metadata) of a .safetensors checkpoint, header checked first
    (`checkpoint_shapes`); safetensors' own errors become CheckpointFileError naming the file."""
    from safetensors import safe_open
    checkpoint_shapes(path)
    sd = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointFileError(f"model checkpoint is unreadable: {_detail(e)}", file=str(path)) from e
    return sd, metadata


class CheckpointWriter:
    """Writes a checkpoint to `path` atomically.

    Creating it claims a temp file beside `path` at once (so an unwritable output fails before any work);
    `write` saves into the temp file and renames it onto `path`. Leaving the `with` block without a
    successful `write` (an error, Ctrl-C) removes the temp file: `path` is then as it was before.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointFileError("output is a folder; give a file name", file=str(self.path))
        folder = self.path.parent
        if not folder.is_dir():
            raise CheckpointFileError("output folder does not exist", file=str(self.path))
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise CheckpointFileError("output exists and is not writable", file=str(self.path))
        self.tmp = folder / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 & ~umask, like any new file (mkstemp would make it 0o600).
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise CheckpointFileError(f"cannot write the output: {e.strerror or e}", file=str(self.path)) from e
        self.done = False

    def write(self, sd: dict, metadata: Optional[dict] = None) -> None:
        """Save `sd` (with string `metadata`) to the temp file, flush it to disk, rename it onto `path`."""
        from safetensors.torch import save_file
        try:
            save_file(sd, str(self.tmp), metadata=metadata)
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
        except (SafetensorError, OSError) as e:
            self.discard()
            raise CheckpointFileError(f"cannot write the output: {_detail(e)}", file=str(self.path)) from e
        self.done = True

    def discard(self) -> None:
        """Remove the temp file (nothing is left where the output would have been)."""
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove the temp file %s: %s", self.tmp, e.strerror or e)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if not self.done:
            self.discard()
