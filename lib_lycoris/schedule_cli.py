"""`python -m lib_lycoris schedule "PROMPT" --steps N [--hires-steps M] [--json] [--presets FILE]`.

Checks tags without a GPU: prints the prompt with the tags removed, every network request (canonical tag),
and for every step its te and unet weights and its in/mid/out block multipliers, then every warning.
The JSON form has one object per network with arrays indexed by step (index 0 = step 1).

Exit status: 0 when there is no warning, 1 when there are warnings, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from .blocks import builtin_presets, load_presets, load_user_presets
from .schedule import format_number
from .tags import NetworkRequest, format_request, parse_prompt, step_table

__all__ = ["add_parser", "run", "report", "main"]

_ROWS = ("te", "unet", "in", "mid", "out")


def add_parser(subparsers: Any) -> None:
    """Add the `schedule` subcommand to an argparse subparsers object (sets `func=run`)."""
    parser = subparsers.add_parser(
        "schedule", help="show what the <lora:...> tags of a prompt do at every step",
        description="Parse the <lora:...>/<lyco:...> tags of PROMPT and print, for every step, the te and unet "
                    "weights and the in/mid/out block multipliers of each network. The multiplier of a UNet "
                    "module in block B is unet x (in|mid|out) x lbw[B].")
    parser.add_argument("prompt", help="the prompt, tags included (quote it)")
    parser.add_argument("--steps", type=int, required=True, help="sampling steps of the first pass")
    parser.add_argument("--hires-steps", type=int, default=None, help="steps of the hires pass, if any")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--presets", default=None,
                        help="LBW presets file to add to the built-in ones (default: lbw_presets.txt of the "
                             "extension folder)")
    parser.set_defaults(func=run)


def _extension_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _pass_dict(req: NetworkRequest, steps: int, hires: bool) -> dict[str, Any]:
    table = step_table(req, steps, hires)
    return {"steps": steps, "step": list(range(1, steps + 1)), **table,
            "change_points": req.change_points(steps, hires)}


def report(prompt: str, steps: int, hires_steps: Optional[int] = None,
           presets_file: Optional[str] = None) -> dict[str, Any]:
    """Everything the command prints, as a JSON-ready dict."""
    warnings: list[str] = []
    if presets_file is None:
        presets, preset_warnings = load_user_presets(_extension_root())
    else:
        presets = builtin_presets()
        user, preset_warnings = load_presets(presets_file)
        if not Path(presets_file).is_file():
            preset_warnings.append(f"presets file {presets_file!r} does not exist")
        presets.update(user)
    warnings.extend(preset_warnings)
    parsed = parse_prompt(prompt, presets)
    warnings.extend(parsed.warnings)
    networks = []
    for req in parsed.requests:
        warnings.extend(req.check_steps(steps, hires_steps))
        networks.append({
            "name": req.name,
            "kind": req.kind,
            "tag": format_request(req),
            "source": req.source,
            "dyn": req.dyn,
            "start": req.start,
            "stop": req.stop,
            "interp": req.interp,
            "lbw": None if req.lbw is None else {"text": req.lbw.text, "weights": req.lbw.as_dict()},
            "unknown": dict(req.unknown),
            "scheduled": req.is_scheduled(),
            "base": _pass_dict(req, steps, False),
            "hires": _pass_dict(req, hires_steps, True) if hires_steps else None,
        })
    return {"prompt": parsed.prompt, "steps": steps, "hires_steps": hires_steps, "networks": networks,
            "warnings": warnings}


def _table(out: TextIO, title: str, data: dict[str, Any]) -> None:
    cells = {row: [format_number(round(v, 6)) for v in data[row]] for row in _ROWS}
    steps = [str(s) for s in data["step"]]
    width = max([len(c) for row in cells.values() for c in row] + [len(s) for s in steps] + [3])
    out.write(f"  {title} ({data['steps']} steps; weights change at steps "
              f"{', '.join(str(s) for s in data['change_points'])})\n")
    out.write("    " + "step".ljust(5) + " ".join(s.rjust(width) for s in steps) + "\n")
    for row in _ROWS:
        out.write("    " + row.ljust(5) + " ".join(c.rjust(width) for c in cells[row]) + "\n")


def _text(out: TextIO, data: dict[str, Any]) -> None:
    out.write(f"prompt: {data['prompt']!r}\n")
    if not data["networks"]:
        out.write("no networks\n")
    for net in data["networks"]:
        out.write(f"\n{net['tag']}\n")
        if net["lbw"] is not None:
            weights = ", ".join(f"{k}={format_number(v)}" for k, v in net["lbw"]["weights"].items())
            out.write(f"  lbw {net['lbw']['text']}: {weights}\n")
        if net["unknown"]:
            out.write(f"  unknown keys (kept): {', '.join(f'{k}={v}' for k, v in net['unknown'].items())}\n")
        _table(out, "pass", net["base"])
        if net["hires"] is not None:
            _table(out, "hires pass", net["hires"])
    out.write("\nmultiplier of a UNet module in block B = unet x (in|mid|out) x lbw[B]; te includes lbw[BASE]\n")
    for w in data["warnings"]:
        out.write(f"warning: {w}\n")


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run the `schedule` subcommand; returns the exit status."""
    stream = out if out is not None else sys.stdout
    if args.steps < 1 or (args.hires_steps is not None and args.hires_steps < 0):
        sys.stderr.write("schedule: --steps must be >= 1 and --hires-steps >= 0\n")
        return 2
    data = report(args.prompt, args.steps, args.hires_steps or None, getattr(args, "presets", None))
    if args.json:
        stream.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        _text(stream, data)
    return 1 if data["warnings"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry point (`python -m lib_lycoris.schedule_cli ...` without the subcommand word)."""
    parser = argparse.ArgumentParser(prog="lib_lycoris")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["schedule", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
