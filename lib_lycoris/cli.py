"""Command line: `python -m lib_lycoris {inspect,merge,schedule} ...`.

    inspect FILE [--json]                              what a network file holds
    merge MODEL NETWORK[:MULT] ... -o OUT [--device D] [--allow-partial]
                                                       bake networks into a checkpoint
    schedule "PROMPT" --steps N [--hires-steps M] [--json]  what the tags do at every step
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from . import schedule_cli
from .errors import LycorisError, PartialMergeError
from .inspect import describe
from .network import load_network
from .patcher import Strength

log = logging.getLogger("lycoris")


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    net = load_network(args.file)
    info = describe(net)
    if args.json:
        json.dump(info, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    out.write(f"{info['name']}  ({info['file']}, {info['size_bytes']} bytes)\n")
    variant = f" {info['variant']}" if info.get("variant") else ""
    out.write(f"base model: {info['base_model']}{variant}  ({info['base_model_reason']})\n")
    out.write(f"modules: {info['modules']}  types: " + ", ".join(f"{k} {v}" for k, v in info["algos"].items()) + "\n")
    out.write("components: " + ", ".join(f"{k} {v}" for k, v in info["components"].items()) + "\n")
    out.write("ranks: " + (", ".join(f"{k} x{v}" for k, v in info["ranks"].items()) or "-") + "\n")
    out.write("blocks: " + ", ".join(f"{k} {v}" for k, v in info["blocks"].items()) + "\n")
    if info["trigger_words"]:
        out.write("trigger words: " + ", ".join(info["trigger_words"]) + "\n")
    if info["training_tags"]:
        out.write("training tags: " + ", ".join(f"{t} ({n})" for t, n in info["training_tags"]) + "\n")
    if info["unknown_keys"]:
        out.write(f"unknown keys ({len(info['unknown_keys'])}, not applied): "
                  + ", ".join(info["unknown_keys"][:10]) + ("…" if len(info["unknown_keys"]) > 10 else "") + "\n")
    return 0


def _split_network_arg(text: str) -> tuple:
    """'path[:mult]' -> (path, mult); a Windows drive letter is not a multiplier."""
    head, sep, tail = text.rpartition(":")
    if sep and head and tail:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _progress(err: TextIO) -> callable:
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} weights "
                  f"{time.perf_counter() - start:.1f}s")
        if done == total:
            err.write("\n")
        err.flush()
    return show


def _merge(args: argparse.Namespace, out: TextIO) -> int:
    """Bake the networks into the model; strict unless --allow-partial (see `merge.bind_networks`)."""
    from .merge import CheckpointWriter, bind_networks, checkpoint_shapes, merge_state_dict, read_checkpoint
    from .modelmap import ModelMap
    strict = not args.allow_partial
    shapes = checkpoint_shapes(args.model)           # a bad model file fails here, before any work
    with CheckpointWriter(args.output) as writer:   # so does an unwritable output; nothing is left on error
        pairs = []
        for spec in args.networks:
            path, mult = _split_network_arg(spec)
            pairs.append((load_network(path), Strength(mult, name=Path(path).stem)))
        try:
            if strict:   # refuse from the header's shapes, before the checkpoint's tensors are read
                bind_networks(ModelMap.from_state_dict(shapes), pairs, strict=True)
            sd, metadata = read_checkpoint(args.model)
            reports = merge_state_dict(sd, pairs, device=args.device, progress=_progress(sys.stderr),
                                       strict=strict)
        except PartialMergeError as e:
            raise PartialMergeError(f"merge refused, nothing written: {e.message}\n(--allow-partial merges "
                                    "the modules that fit and lists the ones it leaves out)",
                                    problems=e.problems) from e
        left_out = 0
        for r in reports:
            out.write(r.summary() + "\n")
            left_out += len(r.unmatched) + len(r.skipped)
            if r.unknown_keys:
                out.write(f"  unknown keys (not merged): {', '.join(r.unknown_keys[:10])}"
                          + ("…" if len(r.unknown_keys) > 10 else "") + "\n")
        if left_out:
            out.write(f"--allow-partial: {left_out} module(s) left out, each in a 'not merged' warning\n")
        metadata["lycoris_merged"] = json.dumps([{"file": str(n.path), "multiplier": s.te} for n, s in pairs])
        writer.write(sd, metadata)
    out.write(f"wrote {args.output}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_lycoris", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="what a network file holds")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_inspect)
    mer = sub.add_parser("merge", help="bake networks into a checkpoint")
    mer.add_argument("model", help="checkpoint .safetensors (original or diffusers layout)")
    mer.add_argument("networks", nargs="+", metavar="NETWORK[:MULT]")
    mer.add_argument("-o", "--output", required=True)
    mer.add_argument("--device", default=None, help="where deltas are computed (default: cuda if available)")
    mer.add_argument("--allow-partial", action="store_true",
                     help="merge even when some modules cannot be: those the model lacks and those whose delta "
                          "does not fit the weight are left out and each is logged. Default: refuse, naming "
                          "them, and write nothing. A network none of whose modules fit is refused either "
                          "way; file keys that belong to no module (e.g. bundled embeddings) are listed, "
                          "never merged, and never refuse a merge")
    mer.set_defaults(func=_merge)
    schedule_cli.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    out = out or sys.stdout
    try:
        if args.func is schedule_cli.run:
            return schedule_cli.run(args, out)
        return args.func(args, out)
    except LycorisError as e:
        log.error("%s", e)
        return 2
