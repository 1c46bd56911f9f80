"""The app's "Export LoRA" action (issue #13): the prompt's network tags as one LoRA file that the Networks panel
then lists, written by the engine's `lib_lycoris.export.export_prompt`. The Gradio panel (`ui`) and
`python -m lycoris_app export` both call `export_from_prompt`; every refusal is one `LycorisError` message.

Where the file goes: `<data dir>/networks/exports/<name>.safetensors`. A sub-folder of the networks folder, so
the index finds it with no folder added to the search (its card and tag name it `exports/<name>`); exports stay
apart from the files a user drops in and can be cleared at once. (The WebUI's action writes into the networks
folder itself, which a WebUI user manages anyway; the app keeps what it writes in one place.)

A name is a plain file name (letters, digits, space and `. ( ) + - _`, no folder, so it cannot leave the
folder); it must not be a name a tag already means (another file's path, stem or alias in any networks folder:
the export would then take over that tag, or make it ambiguous); an existing export is replaced only when asked.

The base weights: the app's loaded model, unpatched (`Session.unpatched`), for the types whose ΔW reads W (DoRA,
OFT, BOFT, IA3, GLoRA) and for the model's module names and shapes (strict: a module the model lacks refuses).
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lib_lycoris.export import DTYPES, MB, TOP_LINES, ExportError, ExportReport, RankMode, export_prompt
from lib_lycoris.tags import format_request, parse_prompt

from .sampling import Session

EXPORTS_FOLDER = "exports"          # inside the first networks folder (<data dir>/networks)
SUFFIX = ".safetensors"
# A file name, no folder (the rule of the WebUI's export tab, scripts/lycoris_webui/export_tab.py).
NAME = re.compile(r"^\w[\w .()+-]{0,120}$")
# What the UI fills in when the rank mode changes ('exact' takes no number).
MODE_DEFAULTS = {"rank": 16, "fro": 0.99, "size-mb": 1.0, "exact": None}
DTYPE_AUTO = "auto"                  # the engine's default: fp16, fp32 for exact
DTYPE_CHOICES = (DTYPE_AUTO, *DTYPES)
# Notes of the report shown on the page (the CLI's --json has them all).
NOTES_SHOWN = 6

Progress = Callable[[str, int, int], None]   # (stage, done, total), as the engine's


@dataclass
class Exported:
    """A written export: the engine's report, the file, and the tag that uses it."""

    report: ExportReport
    path: Path
    relname: str        # its name in the networks index: 'exports/<name>'
    size: int           # bytes of the file
    replaced: bool      # an earlier export of that name was overwritten

    @property
    def tag(self) -> str:
        """The tag that applies what the exported tags applied (their strengths are in the file)."""
        return f"<lora:{self.relname}:1>"

    def to_dict(self) -> dict:
        return {"output": str(self.path), "name": self.relname, "tag": self.tag, "bytes": self.size,
                "replaced": self.replaced, "report": self.report.to_dict()}


def exports_dir(session: Session) -> Path:
    return Path(session.runtime.roots[0]) / EXPORTS_FOLDER


def export_path(session: Session, name: str, overwrite: bool = False) -> Path:
    """The file an export called `name` is written to, after the checks of the module doc.

    Raises: ExportError (no name, not a plain file name, a name a tag already means, an existing export
    without `overwrite`, a linked exports folder)."""
    folder = exports_dir(session)
    name = unicodedata.normalize("NFC", (name or "").strip())    # as the index compares names
    if name.lower().endswith(SUFFIX):
        name = name[:-len(SUFFIX)].rstrip()
    if not name:
        raise ExportError(f"give a file name for the export (it is written into {folder})")
    if not NAME.fullmatch(name):
        raise ExportError(f"{name!r} is not a plain file name: letters, digits, spaces and . ( ) + - _ only, "
                          "starting with a letter or digit, at most 121 characters, no folder")
    if folder.is_symlink():
        raise ExportError("the exports folder is a symbolic link, which the networks index does not enter; "
                          "make it a plain folder", file=str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot make the exports folder: {e.strerror or e}", file=str(folder)) from e
    path = folder / f"{name}{SUFFIX}"
    session.runtime.refresh()
    key = name.casefold()
    for e in session.runtime.index.entries():
        if e.path.parent == folder and e.stem == name:
            continue                 # this export itself (replaced below only with overwrite)
        if key in (e.stem.casefold(), e.relname.casefold(), (e.alias or "").casefold()):
            raise ExportError(f"the name {name!r} is taken: <lora:{name}:…> means {e.relpath} "
                              f"({e.root}); choose another name")
    if path.exists() and not overwrite:
        raise ExportError(f"{EXPORTS_FOLDER}/{path.name} exists; choose another name, or allow overwriting it",
                          file=str(path))
    return path


def _check_tags(prompt: str, step: Optional[int], steps: Optional[int]) -> None:
    """Say in the app's words what a per-step weight needs (the engine's message names the options of
    `python -m lib_lycoris export`); tags the parser warns about are refused by the engine (`export_prompt`)."""
    parsed = parse_prompt(prompt)
    if step is not None:
        if steps is None or steps < 1:
            raise ExportError("the step to export needs the number of steps it is one of")
        if not 1 <= step <= steps:
            raise ExportError(f"the step to export ({step}) is outside 1..{steps}")
        return
    for req in parsed.requests:
        if req.is_scheduled():
            raise ExportError(f"{req.source or format_request(req)}: its weight changes from step to step (a "
                              "schedule or start/stop); give the step to export (the app's Step to export; "
                              "--step S --steps N on the command line)")


def export_from_prompt(session: Session, prompt: str, mode: str, value: Optional[float] = None, name: str = "", *,
                       dtype: Optional[str] = None, step: Optional[int] = None, steps: Optional[int] = None,
                       overwrite: bool = False, progress: Optional[Progress] = None) -> Exported:
    """Export what the prompt's `<lora:…>`/`<lyco:…>` tags apply (te/unet, block weights, dyn; at `step` of
    `steps` for a tag with a per-step weight; hires weights are not used) as one LoRA/LoCon file
    `<data dir>/networks/exports/<name>.safetensors`, and refresh the index so that it is listed.

    Args:
        mode, value: the rank mode as the UI offers it: 'rank' N, 'fro' F, 'size-mb' M, 'exact'.
        dtype: 'fp16' | 'bf16' | 'fp32'; None or 'auto': the engine's default (fp16, fp32 for exact).
        progress: called (stage, done, total) per module.
    Raises: LycorisError (one message) for a bad mode, name, step or tag, an unknown network, or what the engine
        refuses; nothing is written then.
    """
    rank = RankMode.from_choice(mode, value)
    if dtype in (None, "", DTYPE_AUTO):
        dtype = None
    elif dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype!r}")
    path = export_path(session, name, overwrite)
    _check_tags(prompt, step, steps)
    replaced = path.exists()
    with session.unpatched() as weights:
        report = export_prompt(prompt, session.runtime.index, path, rank, step=step,
                               total_steps=steps if step is not None else None, model=weights,
                               model_name=session.model.name, dtype=dtype, device=str(session.model.device),
                               progress=progress)
    session.runtime.refresh()      # the new file is listed (and its name resolves) from now on
    return Exported(report=report, path=path, relname=f"{EXPORTS_FOLDER}/{path.stem}", size=path.stat().st_size,
                    replaced=replaced)


def one_line(message: str) -> str:
    """An error as one line (engine messages that list several problems put them on lines of their own)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_html(x: Exported) -> str:
    """The result panel: file, size, the tag, the summary (retained energy, worst error), notes, worst layers."""
    esc = html.escape
    r = x.report
    notes = [esc(line) for line in r.lines[:NOTES_SHOWN]]
    if len(r.lines) > NOTES_SHOWN:
        notes.append(f"… and {len(r.lines) - NOTES_SHOWN} more")
    rows = "".join(f"<tr><td>{esc(u.name)}</td><td>{esc(u.written)}</td><td>{u.rank}</td>"
                   f"<td>{100 * u.retained:.3f} %</td><td>{u.rel_error:.3g}</td></tr>" for u in r.worst(TOP_LINES))
    return (f'<div class="export-ok"><p><b>{"Replaced" if x.replaced else "Wrote"} {esc(x.relname)}{SUFFIX}</b> '
            f'({x.size / MB:.3f} MB): <code class="export-path">{esc(str(x.path))}</code></p>'
            f'<p>Generate with <code class="export-tag">{esc(x.tag)}</code> in place of the exported tags '
            f"(their strengths are in the file); it is in Networks as {esc(x.relname)}.</p>"
            f'<p class="export-summary">{esc(r.summary())}</p>'
            + (f"<ul>{''.join(f'<li>{n}</li>' for n in notes)}</ul>" if notes else "")
            + "<table><thead><tr><th>layer (least kept first)</th><th>written</th><th>rank</th>"
            f"<th>energy kept</th><th>rel. error</th></tr></thead><tbody>{rows}</tbody></table></div>")


def error_html(message: str) -> str:
    return f'<p class="export-error"><b>Not exported:</b> {html.escape(one_line(message))}</p>'


def prompt_with(prompt: str, tag: str) -> str:
    """The prompt with its network tags replaced by `tag` (to generate with an export of them)."""
    text = parse_prompt(prompt or "").prompt            # the text without the tags the engine reads
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip().rstrip(",").strip()
    return f"{text} {tag}".strip()
