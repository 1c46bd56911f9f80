"""Per-step weight schedules: `w@s,w@s,...` keyframes and their value at a sampling step.

This module owns the number grammar of the prompt tags (what a weight and a keyframe look like) and the
meaning of a schedule at a step. Everything is pure: a `Schedule` is a frozen value, `value_at` is a function
of (step, total_steps, interp).

Semantics (documented for users in docs/tags.md, asserted in tests/test_schedule.py):

- Steps count from 1 to `total_steps`; the value at step s is the value used while the model computes step s
  (no one-step lag, unlike loractl and the old SD.Next code, see research §4.1-4.2).
- Hold (default): a keyframe `w@s` gives `w` from step s until the next keyframe. Before the first keyframe the
  first weight holds (the `np.interp` clamping convention of loractl).
- Linear (`interp=linear`): straight lines between keyframes, clamped outside (loractl's interpolation,
  evaluated at the current 1-based step).
- Fraction mode: when every position is <= 1.0, a position p is a fraction of the pass: it lies at the
  (real-valued) step `1 + p * (total_steps - 1)`, so 0 is the first step and 1 the last. In hold mode the
  keyframe takes effect at the first whole step at or after that point.
- Otherwise positions are absolute steps (real numbers allowed; hold switches at the first whole step >= s).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from .errors import TagError

__all__ = [
    "HOLD",
    "LINEAR",
    "INTERPOLATIONS",
    "Keyframe",
    "Schedule",
    "ScheduleError",
    "constant",
    "format_number",
    "parse_number",
    "parse_schedule",
]

HOLD = "hold"
LINEAR = "linear"
INTERPOLATIONS = (HOLD, LINEAR)

# Positions that differ by less than this are equal (float noise from p * (total - 1)).
_POSITION_EPS = 1e-9
# Keyframe separators accepted between keyframes (loractl accepts both) and between weight and position.
_KEYFRAME_SEPARATORS = re.compile(r"[,;]")
_POSITION_SEPARATORS = re.compile(r"[@~]")
# A plain decimal number: no '_', no 'inf'/'nan', no hex, which Python's float() would also accept.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class ScheduleError(TagError):
    """A weight or schedule text is malformed (bad number, bad keyframe, negative position)."""


def parse_number(text: str, what: str = "weight") -> float:
    """Parse one finite decimal number.

    Args:
        text: the text, surrounding spaces allowed.
        what: the word used in the error message ("weight", "position", ...).

    Raises:
        ScheduleError: not a plain decimal number, or not finite (1e999).
    """
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        raise ScheduleError(f"{what} {text!r} is not a number")
    value = float(stripped)
    if not math.isfinite(value):
        raise ScheduleError(f"{what} {text!r} is not a finite number")
    return value


def format_number(value: float) -> str:
    """Shortest text that parses back to exactly `value` ('1' rather than '1.0')."""
    if value == 0:
        return "0"  # also for -0.0: the sign of zero has no effect on a multiplier
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    return text


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: `weight` from `position` on. `position` is None for a plain constant."""

    weight: float
    position: Optional[float] = None


@dataclass(frozen=True)
class Schedule:
    """A weight that may change with the step: one or more keyframes sorted by position.

    A constant is a single keyframe without position. Build with `constant()` or `parse_schedule()`.
    """

    keyframes: tuple[Keyframe, ...]

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise ScheduleError("a schedule needs at least one keyframe")

    @property
    def is_constant(self) -> bool:
        """True when the value is the same at every step, whatever the step count and interpolation."""
        first = self.keyframes[0].weight
        return all(k.weight == first for k in self.keyframes)

    @property
    def fraction_mode(self) -> bool:
        """True when every position is <= 1.0: positions are fractions of the pass."""
        positions = [k.position for k in self.keyframes if k.position is not None]
        return bool(positions) and max(positions) <= 1.0

    def step_positions(self, total_steps: int) -> list[float]:
        """Keyframe positions as (real-valued) steps of a pass of `total_steps` steps."""
        fraction = self.fraction_mode
        out = []
        for k in self.keyframes:
            position = 1.0 if k.position is None else k.position
            out.append(1.0 + position * (total_steps - 1) if fraction else position)
        return out

    def value_at(self, step: int, total_steps: int, interp: str = HOLD) -> float:
        """Weight during 1-based `step` of a pass of `total_steps` steps.

        Steps outside 1..total_steps are clamped into it.
        """
        if len(self.keyframes) == 1 or self.is_constant:
            return self.keyframes[0].weight
        total = max(1, int(total_steps))
        s = float(min(max(int(step), 1), total))
        positions = self.step_positions(total)
        # Index of the last keyframe at or before s (ties: the last one written wins).
        last = -1
        for i, p in enumerate(positions):
            if p <= s + _POSITION_EPS:
                last = i
        if last < 0:
            return self.keyframes[0].weight
        if interp != LINEAR or last == len(positions) - 1:
            return self.keyframes[last].weight
        p0, p1 = positions[last], positions[last + 1]
        w0, w1 = self.keyframes[last].weight, self.keyframes[last + 1].weight
        t = (s - p0) / (p1 - p0)  # p1 > s >= p0, so p1 > p0
        return w0 + (w1 - w0) * t

    def values(self, total_steps: int, interp: str = HOLD) -> list[float]:
        """`value_at` for every step 1..total_steps (index 0 is step 1)."""
        return [self.value_at(s, total_steps, interp) for s in range(1, total_steps + 1)]

    def out_of_range(self, total_steps: int) -> list[str]:
        """Words about keyframes that a pass of `total_steps` steps never reaches (empty if none)."""
        if len(self.keyframes) == 1 or self.fraction_mode:
            return []
        late = [k for k in self.keyframes if k.position is not None and k.position > total_steps + _POSITION_EPS]
        return [f"keyframe {format_number(k.weight)}@{format_number(k.position)} is after the last step "
                f"{total_steps}" for k in late if k.position is not None]

    def format(self) -> str:
        """Canonical text; `parse_schedule(s.format()) == s`."""
        if len(self.keyframes) == 1 and self.keyframes[0].position is None:
            return format_number(self.keyframes[0].weight)
        return ",".join(f"{format_number(k.weight)}@{format_number(k.position if k.position is not None else 1.0)}"
                        for k in self.keyframes)


def constant(weight: float) -> Schedule:
    """A schedule with the same weight at every step."""
    return Schedule((Keyframe(float(weight)),))


def parse_schedule(text: str) -> Schedule:
    """Parse `w` or `w@s[,w@s...]` (also `;` between keyframes and `~` for `@`, as loractl).

    Raises:
        ScheduleError: empty, a bad number, a negative position, or a keyframe without position in a list.
    """
    parts = _KEYFRAME_SEPARATORS.split(text)
    if len(parts) == 1 and not _POSITION_SEPARATORS.search(text):
        return constant(parse_number(text))
    keyframes = []
    for part in parts:
        pieces = _POSITION_SEPARATORS.split(part)
        if len(pieces) != 2:
            raise ScheduleError(f"keyframe {part!r} is not of the form weight@step")
        weight = parse_number(pieces[0])
        position = parse_number(pieces[1], "position")
        if position < 0:
            raise ScheduleError(f"position {pieces[1].strip()!r} is negative")
        keyframes.append(Keyframe(weight, position))
    # Stable sort: keyframes at the same position keep their order, the last one written wins.
    keyframes.sort(key=lambda k: k.position if k.position is not None else 0.0)
    return Schedule(tuple(keyframes))
