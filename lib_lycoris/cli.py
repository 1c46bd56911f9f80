"""Command line: `python -m lib_lycoris {inspect,merge,schedule,export,extract,resize} ...`.

    inspect FILE [--json]                              what a network file holds
    merge MODEL NETWORK[:MULT] ... -o OUT [--device D] [--allow-partial]
                                                       bake networks into a checkpoint
    schedule "PROMPT" --steps N [--hires-steps M] [--json]  what the tags do at every step
    export NETWORK[:MULT] ... -o OUT [--model CKPT] (--rank N | --fro F | --size-mb M | --exact) [--dtype D]
    export --prompt "<lora:a:0.8:in=0> ..." --networks DIR ... -o OUT (...)
                                                       one LoRA from a stack of networks
    extract TUNED BASE -o OUT (--rank N | --fro F | --size-mb M)   a LoRA of a fine-tune (tuned − base)
    resize IN -o OUT (--rank N | --fro F | --size-mb M)             a network at another rank
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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


# Seconds between two redraws of a progress bar (the last one is always drawn).
PROGRESS_INTERVAL = 0.2


def _progress(err: TextIO, what: str = "weights") -> callable:
    start = time.perf_counter()
    last = [float("-inf")]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done != total and now - last[0] < PROGRESS_INTERVAL:
            return
        last[0] = now
        width = 30
        filled = int(width * done / max(total, 1))
        err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what} "
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


def _staged_progress(err: TextIO) -> callable:
    """A progress bar per stage of an export ('spectra', then 'modules')."""
    bars: dict = {}

    def show(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = _progress(err, "modules" if stage == "modules" else "spectra (pass 1 of --size-mb)")
        bars[stage](done, total)
    return show


def _rank_mode(args: argparse.Namespace):
    from .export import RankMode
    if getattr(args, "exact", False):
        return RankMode.exact()
    if args.rank is not None:
        return RankMode.rank(args.rank)
    if args.fro is not None:
        return RankMode.fro(args.fro)
    return RankMode.size_mb(args.size_mb)


def _export_options(args: argparse.Namespace) -> dict:
    if args.threads:
        torch_threads(args.threads)
    elif _busy():
        # The SVDs of an export are many small LAPACK calls: with other jobs on the cores, OpenMP threads wait
        # at barriers (measured on a 2-core VM at load 4-8: 2 threads took 11x the CPU time of 1).
        log.debug("load average above the number of CPUs: torch uses 1 thread (--threads overrides)")
        torch_threads(1)
    return {"dtype": args.dtype, "device": args.device, "clamp_quantile": args.clamp_quantile, "niter": args.niter,
            "progress": _staged_progress(sys.stderr)}


def torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def _busy() -> bool:
    """Whether the 1-minute load average exceeds the CPUs (False where the OS does not say)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def _print_report(report, out: TextIO, report_path: Optional[str]) -> None:
    from .export import TOP_LINES
    out.write(report.summary() + "\n")
    worst = report.worst(TOP_LINES)
    if worst:
        out.write("worst modules (relative error ‖ΔW − written‖/‖ΔW‖; all in --report FILE.json):\n")
        for u in worst:
            out.write("  " + u.line() + "\n")
    for line in report.lines[:3 * TOP_LINES]:
        out.write(line + "\n")
    if len(report.lines) > 3 * TOP_LINES:
        out.write(f"… and {len(report.lines) - 3 * TOP_LINES} more lines (--report FILE.json)\n")
    if report_path:
        Path(report_path).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        out.write(f"report: {report_path}\n")


def _export_cmd(args: argparse.Namespace, out: TextIO) -> int:
    """One LoRA from a stack of networks (NETWORK[:MULT] ... or --prompt with --networks)."""
    from .export import ExportError, export_networks, export_prompt
    mode = _rank_mode(args)
    opts = _export_options(args)
    opts.update(model=args.model, te_min_diff=args.te_min_diff, strict=not args.allow_partial)
    if args.prompt is not None:
        if args.networks:
            raise ExportError("give networks either as NETWORK[:MULT] arguments or by --prompt, not both")
        if not args.networks_dir:
            raise ExportError("--prompt needs --networks DIR (the folder the tags' names are looked up in)")
        report = export_prompt(args.prompt, args.networks_dir, args.output, mode, step=args.step,
                               total_steps=args.steps, **opts)
    else:
        if not args.networks:
            raise ExportError("no network given: NETWORK[:MULT] ... or --prompt \"<lora:…>\" --networks DIR")
        if args.step is not None or args.steps is not None:
            raise ExportError("--step/--steps go with --prompt (NETWORK:MULT strengths do not change per step)")
        pairs = []
        for spec in args.networks:
            path, mult = _split_network_arg(spec)
            pairs.append((load_network(path), Strength(mult, name=Path(path).stem)))
        report = export_networks(pairs, args.output, mode, **opts)
    _print_report(report, out, args.report)
    return 0


def _extract_cmd(args: argparse.Namespace, out: TextIO) -> int:
    from .export import extract_checkpoint
    report = extract_checkpoint(args.tuned, args.base, args.output, _rank_mode(args), te_min_diff=args.te_min_diff,
                                **_export_options(args))
    _print_report(report, out, args.report)
    return 0


def _resize_cmd(args: argparse.Namespace, out: TextIO) -> int:
    from .export import resize_network
    report = resize_network(args.input, args.output, _rank_mode(args), te_min_diff=args.te_min_diff,
                            **_export_options(args))
    _print_report(report, out, args.report)
    return 0


_SIZE_HELP = ("global budget: M megabytes of lora_down/lora_up tensors (1 MB = 10^6 bytes; the safetensors "
              "header, metadata, alpha, diff and diff_b tensors are extra), spread over all modules by "
              "water-filling: each next rank goes where it removes the most squared error per byte")


def _add_export_options(p: argparse.ArgumentParser, exact: bool) -> None:
    from .export import DTYPES
    from .svd import NITER
    p.add_argument("-o", "--output", required=True, help="the LoRA/LoCon .safetensors to write (atomically)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rank", type=int, help="each module's best rank-N approximation (Eckart–Young); a module "
                                               "of lower rank keeps its own rank")
    mode.add_argument("--fro", type=float, metavar="F",
                      help="each module at the smallest rank that keeps fraction F of ‖ΔW‖_F² (e.g. 0.9)")
    mode.add_argument("--size-mb", type=float, metavar="M", help=_SIZE_HELP)
    if exact:
        mode.add_argument("--exact", action="store_true",
                          help="lossless (verified: relative error ≤ 1e-5 in fp32): LoRA-only modules "
                               "concatenated along the rank with alpha and strength folded in; others at their "
                               "exact rank, or as a full `diff` module where that is no smaller (each such module "
                               "is listed). Default dtype fp32")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written tensors (default fp16; fp32 with --exact)")
    p.add_argument("--device", default=None, help="where the SVDs run (default: cuda if available, else cpu)")
    p.add_argument("--clamp-quantile", type=float, default=None, metavar="Q",
                   help="clamp both factors to the Q-quantile of their absolute values (kohya uses 0.99; "
                        "default: no clamping, which keeps the measured error at the optimum)")
    p.add_argument("--niter", type=int, default=NITER,
                   help=f"power iterations of torch.svd_lowrank on dense ΔW (default {NITER}); low-rank inputs use "
                        "the exact factor-space SVD and need none")
    p.add_argument("--report", metavar="FILE.json", default=None, help="write the per-module error report as JSON")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own, or 1 while the load average exceeds the CPUs)")


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

    from .export import TE_MIN_DIFF_EXTRACT
    exp = sub.add_parser("export", help="one LoRA/LoCon from a stack of networks",
                         description="Write one kohya-style LoRA/LoCon that approximates, per module, "
                                     "ΔW = Σ mult_i·ΔW_i of the inputs (any LyCORIS type). See docs/export.md.")
    exp.add_argument("networks", nargs="*", metavar="NETWORK[:MULT]")
    exp.add_argument("--prompt", default=None,
                     help='export what these tags apply, e.g. "<lora:a:0.8:in=0:out=1> <lora:b:0.5:te=0>": '
                          "te/unet, in/mid/out and lbw block weights and dyn are folded in")
    exp.add_argument("--networks", dest="networks_dir", action="append", default=[], metavar="DIR",
                     help="networks folder the --prompt names are looked up in (repeatable)")
    exp.add_argument("--step", type=int, default=None,
                     help="with --prompt: export the weights of this step (needed when a tag changes per step)")
    exp.add_argument("--steps", type=int, default=None, help="with --step: the number of steps of the pass")
    exp.add_argument("--model", default=None, metavar="CKPT",
                     help="base checkpoint (.safetensors): module names and shapes from the model (strict, as "
                          "merge); required for DoRA, OFT, BOFT, IA3 and GLoRA inputs, whose ΔW depends on W")
    exp.add_argument("--allow-partial", action="store_true",
                     help="with --model: export the modules that fit, listing the ones left out (default: refuse)")
    exp.add_argument("--te-min-diff", type=float, default=0.0, metavar="D",
                     help="leave out a text encoder whose max |ΔW| is ≤ D (default 0: only an unchanged one)")
    _add_export_options(exp, exact=True)
    exp.set_defaults(func=_export_cmd)

    ext = sub.add_parser("extract", help="a LoRA/LoCon of a fine-tuned checkpoint (tuned − base)",
                         description="Per Linear/Conv weight, an SVD of TUNED − BASE (both .safetensors, same "
                                     "layout). See docs/export.md.")
    ext.add_argument("tuned", help="fine-tuned checkpoint .safetensors")
    ext.add_argument("base", help="base checkpoint .safetensors (same layout)")
    ext.add_argument("--te-min-diff", type=float, default=TE_MIN_DIFF_EXTRACT, metavar="D",
                     help=f"leave out a text encoder whose max |ΔW| is ≤ D (default {TE_MIN_DIFF_EXTRACT}, as kohya's "
                          "--min_diff)")
    _add_export_options(ext, exact=False)
    ext.set_defaults(func=_extract_cmd)

    res = sub.add_parser("resize", help="a network at another rank (factor-space SVD)",
                         description="Re-rank one network (usually a LoRA made smaller), keeping its training "
                                     "metadata. See docs/export.md.")
    res.add_argument("input", metavar="IN", help="network file")
    res.add_argument("--te-min-diff", type=float, default=0.0, metavar="D",
                     help="leave out a text encoder whose max |ΔW| is ≤ D (default 0)")
    _add_export_options(res, exact=False)
    res.set_defaults(func=_resize_cmd)
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
