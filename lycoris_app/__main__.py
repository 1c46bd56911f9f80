"""Command line: `python -m lycoris_app serve | generate | networks | export`.

    python -m lycoris_app serve [--port 7861]                       # the Gradio app on 127.0.0.1
    python -m lycoris_app generate "a cat <lora:inkwash_lora:0.8>" --steps 4 --seed 1 -o out.png
    python -m lycoris_app generate "P1" "P2" -o out.png              # one model load: out-0.png, out-1.png
    python -m lycoris_app networks [--json]                          # what the Networks panel shows
    python -m lycoris_app export "<lora:inkwash_lora:0.8> <lora:moss_loha:0.5>" --name mix --exact
                                     # one LoRA in <data dir>/networks/exports/mix.safetensors: <lora:exports/mix:1>

Common options: --data-dir, --ckpt FILE.safetensors (default: the embedded default model),
--networks DIR (more network folders), --threads N, --device cpu|cuda.
Exit status of `generate`: 0 with an image even when tags warn (warnings go to stderr); 2 for bad options.
Exit status of `export`: 0 when written; 2 with one `error:` line on stderr when refused (nothing is written).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("lycoris_app")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="app data (networks/, tokenizer file); default ~/.cache/lycoris_app "
                                      "or $LYCORIS_APP_DATA")
    p.add_argument("--ckpt", type=Path, help="single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors); "
                                             "default: the embedded default model")
    p.add_argument("--networks", action="append", default=[], help="another networks folder (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded model)")
    p.add_argument("--device", default="cpu", help="torch device for a checkpoint (cpu, cuda)")
    p.add_argument("--v-prediction", action=argparse.BooleanOptionalAction, default=None,
                   help="the checkpoint predicts v (default: SD2 yes, others no)")
    p.add_argument("-v", "--verbose", action="store_true")


def _parser() -> argparse.ArgumentParser:
    from lib_lycoris.export import DTYPES

    from .sampling import SAMPLERS

    ap = argparse.ArgumentParser(prog="python -m lycoris_app", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the Gradio app on 127.0.0.1")
    _common(s)
    s.add_argument("--port", type=int, default=7861)
    g = sub.add_parser("generate", help="generate images from prompts with tags")
    _common(g)
    g.add_argument("prompts", nargs="+", help="prompt(s) with <lora:...>/<lyco:...> tags")
    g.add_argument("-n", "--negative", default="")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("-W", "--width", type=int)
    g.add_argument("-H", "--height", type=int)
    g.add_argument("--sampler", default="Euler", choices=list(SAMPLERS))
    g.add_argument("--mode", default="merge", choices=["merge", "bypass"])
    g.add_argument("--hires-scale", type=float, default=1.0, help="> 1 adds a hires pass")
    g.add_argument("--hires-steps", type=int, default=0)
    g.add_argument("--denoise", type=float, default=0.5)
    g.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    g.add_argument("--json", action="store_true", help="print one JSON object per image on stdout")
    g.add_argument("--no-progress", action="store_true")
    n = sub.add_parser("networks", help="list the networks (base model, types, trigger words)")
    _common(n)
    n.add_argument("--json", action="store_true")
    e = sub.add_parser("export", help="the prompt's networks as one LoRA in <data dir>/networks/exports/")
    _common(e)
    e.add_argument("prompt", help="prompt with the <lora:...>/<lyco:...> tags to export (other text is ignored)")
    e.add_argument("--name", required=True, help="file name (no folder); the tag is then <lora:exports/NAME:1>")
    mode = e.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rank", type=int, metavar="N", help="each module's best rank-N approximation")
    mode.add_argument("--fro", type=float, metavar="F", help="the smallest rank keeping fraction F of ‖ΔW‖²")
    mode.add_argument("--size-mb", type=float, metavar="M", help="M megabytes (10^6 bytes) of lora_up/lora_down")
    mode.add_argument("--exact", action="store_true", help="lossless (verified; default dtype fp32)")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16, fp32 with --exact")
    e.add_argument("--step", type=int, help="the step whose weights to export (tags with per-step weights)")
    e.add_argument("--steps", type=int, help="of how many steps (with --step)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export of that name")
    e.add_argument("--json", action="store_true", help="print the result and the whole report as JSON")
    return ap


def _config(a: argparse.Namespace):
    from .app import AppConfig, data_dir

    return AppConfig(data_dir=data_dir(a.data_dir), checkpoint=a.ckpt, networks=a.networks, threads=a.threads,
                     device=a.device, v_prediction=a.v_prediction)


def _outputs(output: Path, n: int) -> list:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]


def cmd_generate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .app import open_session
    from .sampling import GenParams, save_png

    session = open_session(_config(a))
    size = session.model.default_size
    for prompt, out in zip(a.prompts, _outputs(a.output, len(a.prompts))):
        p = GenParams(prompt=prompt, negative=a.negative, steps=a.steps, seed=a.seed, cfg=a.cfg,
                      width=a.width or size, height=a.height or size, sampler=a.sampler, mode=a.mode,
                      hires_scale=a.hires_scale, hires_steps=a.hires_steps, denoise=a.denoise)
        bars: dict = {}

        def progress(step: int, total: int, phase: str) -> None:
            if a.no_progress:
                return
            bar = bars.get(phase)
            if bar is None:
                bar = bars[phase] = tqdm(total=total, desc=phase, unit="step", file=sys.stderr, leave=True)
            bar.update(1)

        try:
            session.check(p)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        r = session.generate(p, progress)
        for bar in bars.values():
            bar.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(r.image, r.infotext, out)
        for w in r.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if a.json:
            print(json.dumps({"output": str(out), "infotext": r.infotext, "warnings": r.warnings,
                              "weights": r.weights, "hires_weights": r.hires_weights, "seconds": round(r.seconds, 3)}))
        else:
            print(f"{out}  ({r.seconds:.2f} s)")
    return 0


def cmd_networks(a: argparse.Namespace) -> int:
    from .app import network_cards, open_session

    cards = network_cards(open_session(_config(a)))
    if a.json:
        print(json.dumps(cards, indent=1))
    else:
        for c in cards:
            algos = ", ".join(f"{k}×{v}" for k, v in c["algos"].items())
            print(f"{c['tag']:32} {c['base_model']:6} {algos:24} {', '.join(c['trigger_words'])}"
                  + (f"  ERROR {c['error']}" if c["error"] else ""))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from lib_lycoris.errors import LycorisError
    from lib_lycoris.export import MB

    from .app import open_session
    from .export import export_from_prompt, one_line

    given = [(m, v) for m, v in (("rank", a.rank), ("fro", a.fro), ("size-mb", a.size_mb)) if v is not None]
    mode, value = ("exact", None) if a.exact else given[0]
    session = open_session(_config(a))
    try:
        x = export_from_prompt(session, a.prompt, mode, value, a.name, dtype=a.dtype, step=a.step, steps=a.steps,
                               overwrite=a.overwrite)
    except LycorisError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(x.to_dict(), ensure_ascii=False))
        return 0
    print(f"{'replaced' if x.replaced else 'wrote'} {x.path} ({x.size / MB:.3f} MB)")
    print(x.report.summary())
    for line in x.report.lines:
        print(f"  {line}")
    print(f"tag: {x.tag}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .app import open_session
    from .ui import serve

    serve(open_session(_config(a)), port=a.port)
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not a.verbose:   # the engine's per-tag warnings come back in the result and are printed once
        logging.getLogger("lycoris").setLevel(logging.ERROR)
    return {"generate": cmd_generate, "networks": cmd_networks, "export": cmd_export,
            "serve": cmd_serve}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
