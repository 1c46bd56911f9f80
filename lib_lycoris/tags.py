"""Prompt tags `<lora:name:...>` / `<lyco:name:...>`: parsing, canonical formatting, per-step weights.

This module owns the tag grammar (user documentation: docs/tags.md) and the `NetworkRequest` value that says
which network to apply at which weight, for which component and block, at which step. Pure logic: no model,
no files (name resolution lives in `names`, block maps in `blocks`, schedules in `schedule`).

Grammar (research/syntax_features.md §1): a tag is `<` kind `:` name { `:` item } `>`, kind `lora` or `lyco`
(case-insensitive). Items split on `:`; an item with exactly one `=` is named, any other item positional.

- positional 1 = strength (te, and unet unless given), 2 = unet (or, LBW legacy, a block preset/list),
  3 = dyn; an empty positional counts as not written; more positionals are ignored with a warning.
- named: te, unet, dyn, in, mid, out, lbw (alias w), start, stop, step (A-B), hr, hrte, hrunet, interp;
  known keys are case-insensitive; unknown keys are kept in `unknown` and reported once per prompt.

Fallbacks (A1111 / loractl compatible): te := te= or pos1 or 1; unet := unet= or pos2 or te (so `te=0` alone
silences the UNet too, as in A1111); hrte := hrte= or hr= or te; hrunet := hrunet= or hr= or unet;
in/mid/out := 1 (block multipliers of the unet weight); lbw := 1 for every block. A bad value warns and falls
back as if it had not been written; a tag with no usable name or a malformed body is skipped.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .blocks import BlockWeightError, BlockWeights, coarse_block, parse_lbw
from .errors import TagError
from .schedule import HOLD, INTERPOLATIONS, Schedule, ScheduleError, constant, parse_schedule

__all__ = [
    "KINDS",
    "KNOWN_KEYS",
    "NetworkRequest",
    "PromptParse",
    "format_request",
    "parse_prompt",
    "parse_tag",
    "step_table",
]

logger = logging.getLogger("lycoris")

KINDS = ("lora", "lyco")
COMPONENTS = ("te1", "te2", "te3", "unet")
TEXT_ENCODERS = ("te1", "te2", "te3")
# Named keys this module understands; `w` is LBW's alias of `lbw`, `step=A-B` LBW's start+stop.
KNOWN_KEYS = ("te", "unet", "dyn", "in", "mid", "out", "lbw", "w", "start", "stop", "step", "hr", "hrte",
              "hrunet", "interp")
# Longest piece of a tag quoted in a warning.
_QUOTE_LIMIT = 80
_TAG_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)
_TAG_FULL = re.compile(r"<(\w+):(.*)>", re.DOTALL)
_INT = re.compile(r"\+?\d+")
_STEP_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_NAME_FORBIDDEN = re.compile(r"[:<>\x00-\x1f\x7f]")
_ONE = constant(1.0)


def _quote(text: str) -> str:
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 1] + "…"


@dataclass(frozen=True)
class NetworkRequest:
    """One network asked for by one tag, with every weight as written (None = falls back, see module doc).

    Attributes:
        name: network name as written (resolve with `names.NetworkIndex`).
        kind: 'lora' or 'lyco' (the same thing; kept to write the tag back as the user wrote it).
        te: text-encoder weight (pos1 or te=), default 1.
        unet, hr, hrte, hrunet: None when not written.
        block_in, block_mid, block_out: coarse block multipliers (in=, mid=, out=), default 1.
        lbw: LBW block weights (lbw=), None = 1 everywhere.
        dyn: DyLoRA rank limit.
        start, stop: first and last step (1-based, inclusive) at which the network is on.
        interp: 'hold' or 'linear', for every schedule of the tag.
        unknown: named items this module does not know (kept for other extensions).
        source: the tag text it was parsed from (not part of equality).
    """

    name: str
    kind: str = "lora"
    te: Schedule = _ONE
    unet: Optional[Schedule] = None
    hr: Optional[Schedule] = None
    hrte: Optional[Schedule] = None
    hrunet: Optional[Schedule] = None
    block_in: Schedule = _ONE
    block_mid: Schedule = _ONE
    block_out: Schedule = _ONE
    lbw: Optional[BlockWeights] = None
    dyn: Optional[int] = None
    start: Optional[int] = None
    stop: Optional[int] = None
    interp: str = HOLD
    unknown: dict[str, str] = field(default_factory=dict, hash=False)
    source: str = field(default="", compare=False)

    # --- effective schedules --------------------------------------------------------------------------------
    def te_schedule(self, hires: bool = False) -> Schedule:
        """The text-encoder schedule in the first pass or (hires=True) the hires pass."""
        if hires:
            return self.hrte if self.hrte is not None else self.hr if self.hr is not None else self.te
        return self.te

    def unet_schedule(self, hires: bool = False) -> Schedule:
        """The UNet schedule in the first pass or (hires=True) the hires pass."""
        base = self.unet if self.unet is not None else self.te
        if hires:
            return self.hrunet if self.hrunet is not None else self.hr if self.hr is not None else base
        return base

    def block_schedule(self, coarse: str) -> Schedule:
        """The in/mid/out multiplier schedule for 'in', 'mid' or 'out'."""
        return {"in": self.block_in, "mid": self.block_mid, "out": self.block_out}[coarse]

    def schedules(self) -> list[Schedule]:
        """Every schedule written or implied in the tag."""
        found = [self.te, self.block_in, self.block_mid, self.block_out]
        found += [s for s in (self.unet, self.hr, self.hrte, self.hrunet) if s is not None]
        return found

    # --- per-step values ------------------------------------------------------------------------------------
    def active(self, step: int, total_steps: int) -> bool:
        """start/stop gating at 1-based `step` (each pass counts its own steps)."""
        s = _clamp_step(step, total_steps)
        return (self.start is None or s >= self.start) and (self.stop is None or s <= self.stop)

    def component_weight(self, component: str, step: int, total_steps: int, hires: bool = False,
                         te_block: str = "BASE") -> float:
        """te or unet weight at `step` with start/stop gating; for te also times the LBW weight of the text
        encoders' id (`te_block`: 'BASE', or 'CLIP' / 'T5' on SD3 and Flux)."""
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, not {component!r}")
        s = _clamp_step(step, total_steps)
        if not self.active(s, total_steps):
            return 0.0
        if component in TEXT_ENCODERS:
            value = self.te_schedule(hires).value_at(s, total_steps, self.interp)
            return value * (self.lbw.get(te_block) if self.lbw is not None else 1.0)
        return self.unet_schedule(hires).value_at(s, total_steps, self.interp)

    def block_weight(self, block: Optional[str], step: int, total_steps: int) -> float:
        """Block multiplier of a UNet module at `step`: in/mid/out schedule × LBW weight of its id.

        None (modules outside the blocks: time embedding, label embedding, final out) gives 1.
        """
        coarse = coarse_block(block)
        if coarse is None or block is None:
            return 1.0
        lbw = self.lbw.get(block) if self.lbw is not None else 1.0
        if coarse == "te":
            return lbw
        s = _clamp_step(step, total_steps)
        return self.block_schedule(coarse).value_at(s, total_steps, self.interp) * lbw

    def weight(self, component: str, block: Optional[str], step: int, total_steps: int,
               hires: bool = False) -> float:
        """Effective multiplier of one module at 1-based `step` = component weight × block weight.

        Args:
            component: 'te1' | 'te2' | 'te3' | 'unet' (the text encoders all use the te weight).
            block: LBW id of the module ('BASE', 'IN00'.., 'M00', 'OUT00'..; 'CLIP', 'T5', 'IN', 'D00'..,
                'S00'.., 'OUT' on transformers), None for UNet modules outside the blocks (they get the unet
                weight alone). For text encoders only its LBW weight counts ('BASE' when None).
            step: 1..total_steps (clamped into that range).
            total_steps: steps of this pass (the hires pass counts its own).
            hires: use the hires weights (hr, hrte, hrunet).
        """
        te_block = block if component in TEXT_ENCODERS and block in ("CLIP", "T5") else "BASE"
        w = self.component_weight(component, step, total_steps, hires, te_block)
        if component == "unet" and w != 0.0:
            w *= self.block_weight(block, step, total_steps)
        return w

    def is_scheduled(self) -> bool:
        """True if any weight may change from one step to another (schedules or start/stop)."""
        gated = (self.start is not None and self.start > 1) or self.stop is not None
        return gated or not all(s.is_constant for s in self.schedules())

    def step_values(self, step: int, total_steps: int, hires: bool = False) -> tuple[float, ...]:
        """(te, unet, in, mid, out) at `step`: what `change_points` compares."""
        return (self.component_weight("te1", step, total_steps, hires),
                self.component_weight("unet", step, total_steps, hires),
                self.block_schedule("in").value_at(step, total_steps, self.interp),
                self.block_schedule("mid").value_at(step, total_steps, self.interp),
                self.block_schedule("out").value_at(step, total_steps, self.interp))

    def change_points(self, total_steps: int, hires: bool = False) -> list[int]:
        """Steps at which any weight differs from the step before; step 1 is always included."""
        if total_steps < 1:
            return []
        if not self.is_scheduled():
            return [1]
        def signature(s: int) -> tuple[float, ...]:
            # While the network is off, block multipliers that change do not change anything.
            return self.step_values(s, total_steps, hires) if self.active(s, total_steps) else ()

        points = [1]
        previous = signature(1)
        for s in range(2, total_steps + 1):
            current = signature(s)
            if current != previous:
                points.append(s)
            previous = current
        return points

    def check_steps(self, total_steps: int, hires_steps: Optional[int] = None) -> list[str]:
        """Warnings about parts of the tag that a run of this many steps never reaches."""
        problems: list[str] = []
        tag = _quote(self.source or format_request(self))
        passes = [(total_steps, False)] + ([(hires_steps, True)] if hires_steps else [])
        for steps, hires in passes:
            label = "hires pass" if hires else "pass"
            used = [self.te_schedule(hires), self.unet_schedule(hires), self.block_in, self.block_mid,
                    self.block_out]
            for text in dict.fromkeys(m for s in used for m in s.out_of_range(steps)):
                problems.append(f"{tag}: {text} of the {label} ({steps} steps)")
            if self.start is not None and self.start > steps:
                problems.append(f"{tag}: start={self.start} is after the last step of the {label} ({steps} "
                                "steps); the network is off for the whole pass")
        return problems


def _clamp_step(step: int, total_steps: int) -> int:
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, not {total_steps}")
    return min(max(int(step), 1), int(total_steps))


@dataclass
class PromptParse:
    """Result of `parse_prompt`: the prompt without our tags, the requests in prompt order, the warnings."""

    prompt: str
    requests: list[NetworkRequest] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Problems:
    """Collects the problems of one tag: raises at the first error (strict) or keeps them as warnings."""

    def __init__(self, tag: str, sink: Optional[list[str]]) -> None:
        self.tag = _quote(tag)
        self.sink = sink

    def error(self, message: str, fallback: str) -> None:
        if self.sink is None:
            raise TagError(message, key=self.tag)
        self.sink.append(f"{self.tag}: {message}; {fallback}")


# What a bad weight falls back to, in the words of the warning.
_FALLBACKS = {
    "strength": "strength 1 is used",
    "te": "the strength (positional 1, else 1) is used",
    "unet": "the te weight is used",
    "in": "1 is used", "mid": "1 is used", "out": "1 is used",
    "hr": "the first-pass weights are used in the hires pass",
    "hrte": "hr, else te, is used in the hires pass",
    "hrunet": "hr, else unet, is used in the hires pass",
}


def _schedule(value: str, key: str, problems: _Problems) -> Optional[Schedule]:
    try:
        return parse_schedule(value)
    except ScheduleError as e:
        problems.error(f"{key}: {e.message}", _FALLBACKS.get(key, f"{key} ignored"))
        return None


def _int(value: str, key: str, problems: _Problems, minimum: int) -> Optional[int]:
    text = value.strip()
    if not _INT.fullmatch(text) or int(text) < minimum:
        problems.error(f"{key}={text!r} is not a whole number >= {minimum}", f"{key} ignored")
        return None
    return int(text)


def _lbw(value: str, key: str, problems: _Problems,
         presets: Optional[Mapping[str, Sequence[float]]]) -> Optional[BlockWeights]:
    try:
        return parse_lbw(value, presets)
    except BlockWeightError as e:
        problems.error(f"{key}: {e.message}", "block weights ignored (1 for every block)")
        return None


def parse_tag(text: str, warnings: Optional[list[str]] = None,
              presets: Optional[Mapping[str, Sequence[float]]] = None) -> NetworkRequest:
    """Parse one tag `<lora:name:...>` (or `<lyco:...>`).

    Args:
        text: the whole tag, angle brackets included (surrounding spaces allowed).
        warnings: None = strict: any problem raises TagError. A list = lenient: recoverable problems (bad
            numbers, bad lists, unknown presets, extra positionals, repeated keys) and unknown keys are
            appended to it and the weight falls back; only a tag that cannot name a network raises.
        presets: LBW presets by name (None = built-in presets; see `blocks.load_user_presets`).

    Raises:
        TagError: not a lora/lyco tag, empty or invalid name; in strict mode any other problem.
    """
    req = _parse(text, warnings, presets)
    if warnings is not None and req.unknown:
        warnings.append(_unknown_warning(req.source, list(req.unknown)))
    return req


def _unknown_warning(tag: str, keys: list[str]) -> str:
    return f"{_quote(tag)}: unknown key(s) {', '.join(keys)} kept for other extensions, not used here"


def _parse(text: str, warnings: Optional[list[str]],
           presets: Optional[Mapping[str, Sequence[float]]]) -> NetworkRequest:
    """`parse_tag` without the unknown-key report (`parse_prompt` reports those once per prompt)."""
    if not isinstance(text, str):
        raise TagError(f"a tag is a string, not {type(text).__name__}")
    stripped = text.strip()
    m = _TAG_FULL.fullmatch(stripped)
    if m is None or m.group(1).lower() not in KINDS:
        raise TagError("not a <lora:name:...> or <lyco:name:...> tag", key=_quote(stripped))
    body = m.group(2)
    if "<" in body or ">" in body:
        raise TagError("unbalanced '<' or '>' inside the tag", key=_quote(stripped))
    problems = _Problems(stripped, warnings)
    items = body.split(":")
    name = items[0].strip()
    if not name:
        raise TagError("the tag has no network name", key=problems.tag)
    if _NAME_FORBIDDEN.search(name):
        raise TagError("the network name contains a control character", key=problems.tag)

    values: dict[str, Optional[object]] = {}
    unknown: dict[str, str] = {}
    positional: list[str] = []

    def put(key: str, value: object) -> None:
        if value is None:
            return
        if values.get(key) is not None:
            problems.error(f"{key} is given twice", "the last one is used")
        values[key] = value

    for raw in items[1:]:
        item = raw.strip()
        parts = item.split("=")
        if len(parts) != 2:
            positional.append(item)
            continue
        key, value = parts[0].strip(), parts[1].strip()
        low = key.lower()
        if not key:
            problems.error(f"item {item!r} has no key", "item ignored")
        elif low in ("te", "unet", "in", "mid", "out", "hr", "hrte", "hrunet"):
            schedule = _schedule(value, low, problems)
            if schedule is not None:
                put(low, schedule)
        elif low in ("lbw", "w"):
            weights = _lbw(value, key, problems, presets)
            if weights is not None:
                put("lbw", weights)
        elif low == "dyn":
            put("dyn", _int(value, "dyn", problems, 1))
        elif low in ("start", "stop"):
            put(low, _int(value, low, problems, 0))
        elif low == "step":
            rng = _STEP_RANGE.fullmatch(value)
            if rng is None:
                problems.error(f"step={value!r} is not a range A-B", "step ignored")
            else:
                put("start", int(rng.group(1)))
                put("stop", int(rng.group(2)))
        elif low == "interp":
            if value.lower() in INTERPOLATIONS:
                put("interp", value.lower())
            else:
                problems.error(f"interp={value!r} is not one of {', '.join(INTERPOLATIONS)}",
                               f"'{HOLD}' is used")
        else:
            if key in unknown:
                problems.error(f"{key} is given twice", "the last one is kept")
            unknown[key] = value

    # Positionals: 1 strength, 2 unet (or LBW legacy block preset/list), 3 dyn.
    if len(positional) >= 1 and positional[0]:
        schedule = _schedule(positional[0], "strength", problems)
        if schedule is not None and values.get("te") is None:
            values["te"] = schedule
    if len(positional) >= 2 and positional[1]:
        second = positional[1]
        if "@" not in second and "~" not in second and ("," in second or second[:1].isalpha()):
            weights = _lbw(second, "block weights", problems, presets)
            if weights is not None and values.get("lbw") is None:
                values["lbw"] = weights
        else:
            schedule = _schedule(second, "unet", problems)
            if schedule is not None and values.get("unet") is None:
                values["unet"] = schedule
    if len(positional) >= 3 and positional[2]:
        dyn = _int(positional[2], "dyn", problems, 1)
        if dyn is not None and values.get("dyn") is None:
            values["dyn"] = dyn
    extra = [p for p in positional[3:] if p]
    if extra:
        problems.error(f"more than 3 positional items ({', '.join(repr(p) for p in extra)})", "extra ignored")

    start, stop = values.get("start"), values.get("stop")
    if isinstance(start, int) and isinstance(stop, int) and stop < start:
        problems.error(f"stop={stop} is before start={start}", "the network is never applied")
    return NetworkRequest(
        name=name,
        kind=m.group(1).lower(),
        te=values.get("te") or _ONE,  # type: ignore[arg-type]
        unet=values.get("unet"),  # type: ignore[arg-type]
        hr=values.get("hr"),  # type: ignore[arg-type]
        hrte=values.get("hrte"),  # type: ignore[arg-type]
        hrunet=values.get("hrunet"),  # type: ignore[arg-type]
        block_in=values.get("in") or _ONE,  # type: ignore[arg-type]
        block_mid=values.get("mid") or _ONE,  # type: ignore[arg-type]
        block_out=values.get("out") or _ONE,  # type: ignore[arg-type]
        lbw=values.get("lbw"),  # type: ignore[arg-type]
        dyn=values.get("dyn"),  # type: ignore[arg-type]
        start=start,  # type: ignore[arg-type]
        stop=stop,  # type: ignore[arg-type]
        interp=values.get("interp") or HOLD,  # type: ignore[arg-type]
        unknown=unknown,
        source=stripped,
    )


def format_request(req: NetworkRequest) -> str:
    """Canonical tag text: `<kind:name:te[:unet][:key=value...]>`; parse_tag(format_request(r)) == r.

    Raises:
        TagError: the request cannot be written as a tag (name or unknown item with ':' '>' '<' or '=').
    """
    name = req.name.strip()
    if not name or _NAME_FORBIDDEN.search(name) or "<" in name or ">" in name:
        raise TagError("this network name cannot be written in a tag", key=req.name)
    if req.kind not in KINDS:
        raise TagError(f"kind must be one of {', '.join(KINDS)}", key=req.kind)
    items = [name, req.te.format()]
    if req.unet is not None:
        items.append(req.unet.format())
    if req.dyn is not None:
        items.append(f"dyn={req.dyn}")
    for key, schedule in (("hr", req.hr), ("hrte", req.hrte), ("hrunet", req.hrunet)):
        if schedule is not None:
            items.append(f"{key}={schedule.format()}")
    for key, schedule in (("in", req.block_in), ("mid", req.block_mid), ("out", req.block_out)):
        if schedule != _ONE:
            items.append(f"{key}={schedule.format()}")
    if req.lbw is not None:
        items.append(f"lbw={req.lbw.text}")
    if req.start is not None:
        items.append(f"start={req.start}")
    if req.stop is not None:
        items.append(f"stop={req.stop}")
    if req.interp != HOLD:
        items.append(f"interp={req.interp}")
    for key, value in req.unknown.items():
        bad = re.search(r"[:<>=]", key + value) or not key.strip() or key != key.strip() or value != value.strip()
        if bad or key.lower() in KNOWN_KEYS:
            raise TagError(f"unknown item {key}={value} cannot be written in a tag", key=req.name)
        items.append(f"{key}={value}")
    return f"<{req.kind}:{':'.join(items)}>"


def parse_prompt(prompt: str, presets: Optional[Mapping[str, Sequence[float]]] = None) -> PromptParse:
    """Find every `<lora:...>`/`<lyco:...>` tag in a prompt; never raises.

    Well-formed tags are removed from the prompt text (even when skipped for a bad name); an opening
    `<lora:` with no `>` before the next `<` or the end is left in the text with a warning. Other `<kind:...>`
    tags (hypernet, ...) are left alone. Unknown keys are reported once per prompt.

    Args:
        prompt: the prompt text.
        presets: LBW presets by name (None = built-in).
    """
    if not isinstance(prompt, str):
        return PromptParse(prompt="", warnings=[f"prompt is not a string ({type(prompt).__name__}); ignored"])
    pieces: list[str] = []
    requests: list[NetworkRequest] = []
    warnings: list[str] = []
    reported_unknown: set[str] = set()
    seen_names: set[str] = set()
    position = 0
    cursor = 0
    while True:
        m = _TAG_OPEN.search(prompt, position)
        if m is None:
            break
        close = prompt.find(">", m.end())
        reopen = prompt.find("<", m.end())
        if close < 0 or (0 <= reopen < close):
            warnings.append(f"{_quote(prompt[m.start():m.start() + _QUOTE_LIMIT])}: unbalanced tag (no '>'); "
                            "left in the prompt, not applied")
            position = m.end()
            continue
        tag = prompt[m.start():close + 1]
        pieces.append(prompt[cursor:m.start()])
        cursor = position = close + 1
        tag_warnings: list[str] = []
        try:
            req = _parse(tag, tag_warnings, presets)
        except TagError as e:
            warnings.append(f"{_quote(tag)}: {e.message}; tag skipped")
            continue
        warnings.extend(tag_warnings)
        fresh = [k for k in req.unknown if k not in reported_unknown]
        if fresh:
            reported_unknown.update(fresh)
            warnings.append(_unknown_warning(tag, fresh))
        if req.name in seen_names:
            warnings.append(f"{_quote(tag)}: network {req.name!r} is already in the prompt; both tags apply and "
                            "their effects add up")
        seen_names.add(req.name)
        requests.append(req)
    pieces.append(prompt[cursor:])
    for w in warnings:
        logger.debug("tag warning: %s", w)
    return PromptParse(prompt="".join(pieces), requests=requests, warnings=warnings)


def step_table(req: NetworkRequest, total_steps: int, hires: bool = False) -> dict[str, list[float]]:
    """Per-step values of one request: keys te, unet, in, mid, out; index 0 is step 1.

    te and unet are the component weights with start/stop gating (te times LBW BASE); in/mid/out are the
    block multipliers. The multiplier of a UNet module in block B is unet × (in|mid|out) × lbw[B].
    """
    rows: dict[str, list[float]] = {"te": [], "unet": [], "in": [], "mid": [], "out": []}
    for s in range(1, total_steps + 1):
        for key, value in zip(rows, req.step_values(s, total_steps, hires)):
            rows[key].append(value)
    return rows
