"""Schedules: number grammar, hold/linear evaluation, fraction mode, and the step tables of docs/tags.md."""
from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from lib_lycoris import schedule_cli
from lib_lycoris.schedule import (LINEAR, Keyframe, Schedule, ScheduleError, constant, format_number,
                                  parse_number, parse_schedule)
from lib_lycoris.tags import parse_prompt, step_table


@pytest.mark.parametrize("text,value", [("1", 1.0), (" 0.5 ", 0.5), ("-1.25", -1.25), (".5", 0.5), ("1.", 1.0),
                                        ("1e-3", 0.001), ("+2", 2.0)])
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "nan", "inf", "1e999", "1_000", "0x10", "1,5", "--1", "1 2"])
def test_parse_number_rejects(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_number(text)


@pytest.mark.parametrize("text", ["", "1@", "@1", "1@-2", "1,2", "1@2@3", "a@1", "1@b", "0.5@1;", "1@inf"])
def test_parse_schedule_rejects(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_schedule(text)


def test_parse_schedule_separators_and_sort() -> None:
    s = parse_schedule("1@10; 0~2")
    assert s.keyframes == (Keyframe(0.0, 2.0), Keyframe(1.0, 10.0))
    assert s.format() == "0@2,1@10"


def test_constant() -> None:
    assert parse_schedule("0.7") == constant(0.7)
    assert constant(0.7).values(3) == [0.7, 0.7, 0.7]
    assert constant(0.7).is_constant


@pytest.mark.parametrize("value,text", [(1.0, "1"), (0.1, "0.1"), (-0.0, "0"), (1e-7, "1e-07"), (2.5, "2.5")])
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text
    assert float(text) == value


def table(tag: str, steps: int, row: str = "unet", hires: bool = False) -> list[float]:
    parsed = parse_prompt(tag)
    assert not parsed.warnings, parsed.warnings
    return [round(v, 6) for v in step_table(parsed.requests[0], steps, hires)[row]]


# The step-by-step table of docs/tags.md ("What each example gives"): tag, steps, row, values for steps 1..N.
DOC_TABLE = [
    ("<lora:a:te=0.1@1,0.6@6>", 10, "te", [.1, .1, .1, .1, .1, .6, .6, .6, .6, .6]),
    ("<lora:a:te=0.1@1,0.6@6>", 10, "unet", [.1, .1, .1, .1, .1, .6, .6, .6, .6, .6]),
    ("<lora:a:te=0.1@1,0.6@6:interp=linear>", 10, "te", [.1, .2, .3, .4, .5, .6, .6, .6, .6, .6]),
    ("<lora:a:1:start=3>", 5, "unet", [0, 0, 1, 1, 1]),
    ("<lora:a:1:stop=2>", 4, "unet", [1, 1, 0, 0]),
    ("<lora:a:1:step=2-3>", 5, "unet", [0, 1, 1, 0, 0]),
    ("<lora:a:0@0,1@0.5>", 10, "unet", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("<lora:a:0@0,1@1:interp=linear>", 5, "unet", [0, .25, .5, .75, 1]),
    ("<lora:a:1@0,0.5@0.25,0@0.75>", 9, "unet", [1, 1, .5, .5, .5, .5, 0, 0, 0]),
    ("<lora:a:0@5,1@8>", 10, "unet", [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]),
    ("<lora:a:0.5@5,1@10:interp=linear>", 10, "unet", [.5, .5, .5, .5, .5, .6, .7, .8, .9, 1]),
    ("<lora:a:0.8:out=0@1,1@4>", 6, "out", [0, 0, 0, 1, 1, 1]),
    ("<lora:a:0.8:out=0@1,1@4>", 6, "unet", [.8, .8, .8, .8, .8, .8]),
    ("<lora:a:te=0>", 3, "unet", [0, 0, 0]),
    ("<lora:a:te=0:unet=1>", 3, "unet", [1, 1, 1]),
    ("<lora:a:1:0.5>", 3, "unet", [.5, .5, .5]),
]


@pytest.mark.parametrize("tag,steps,row,values", DOC_TABLE)
def test_issue_examples(tag: str, steps: int, row: str, values: list[float]) -> None:
    assert table(tag, steps, row) == [round(v, 6) for v in values]


DOCS = Path(__file__).resolve().parent.parent / "docs" / "tags.md"
_DOC_ROW = re.compile(r"^\| `(<[^`]+>)` \| (first|hires) \| (\d+) \| (\w+) \|(.*)\|\s*$")


def doc_rows() -> list[tuple[str, bool, int, str, list[float]]]:
    rows = []
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        m = _DOC_ROW.match(line)
        if m:
            cells = [c.strip() for c in m.group(5).split("|")]
            values = [float(c) for c in cells if c]
            rows.append((m.group(1), m.group(2) == "hires", int(m.group(3)), m.group(4), values))
    return rows


def test_doc_table_is_found() -> None:
    rows = doc_rows()
    assert len(rows) >= 20 and any(hires for _, hires, *_ in rows)


@pytest.mark.parametrize("tag,hires,steps,row,values", doc_rows())
def test_doc_table(tag: str, hires: bool, steps: int, row: str, values: list[float]) -> None:
    """docs/tags.md "What each example gives": every cell, rounded to 3 decimals as printed there."""
    assert len(values) == steps
    parsed = parse_prompt(tag)
    assert not parsed.warnings, parsed.warnings
    got = [round(v, 3) for v in step_table(parsed.requests[0], steps, hires)[row]]
    assert got == values


HIRES_TABLE = [
    ("<lora:a:0.8:hr=0.3>", 3, "te", [.3, .3, .3]),
    ("<lora:a:0.8:hr=0.3:hrunet=1>", 3, "unet", [1, 1, 1]),
    ("<lora:a:0.8:0.6>", 3, "unet", [.6, .6, .6]),
    ("<lora:a:0.8:hrte=0.2>", 3, "unet", [.8, .8, .8]),
    ("<lora:a:1:stop=2>", 3, "unet", [1, 1, 0]),
]


@pytest.mark.parametrize("tag,steps,row,values", HIRES_TABLE)
def test_hires_table(tag: str, steps: int, row: str, values: list[float]) -> None:
    assert table(tag, steps, row, hires=True) == values


def test_before_first_keyframe_holds_first_weight() -> None:
    assert parse_schedule("0.2@3,1@5").values(6) == [0.2, 0.2, 0.2, 0.2, 1.0, 1.0]


def test_same_position_last_written_wins() -> None:
    assert parse_schedule("0@2,1@2").values(3) == [0.0, 1.0, 1.0]
    assert parse_schedule("0@2,1@2").values(3, LINEAR) == [0.0, 1.0, 1.0]


def test_steps_clamped_and_single_step() -> None:
    s = parse_schedule("0@1,1@3")
    assert s.value_at(0, 3) == 0.0 and s.value_at(99, 3) == 1.0
    assert parse_schedule("0@0,1@1").values(1) == [1.0]


def test_out_of_range_reported() -> None:
    assert parse_schedule("0@1,1@30").out_of_range(20)
    assert not parse_schedule("0@0,1@1").out_of_range(3)


@given(st.lists(st.tuples(st.floats(-10, 10, allow_nan=False), st.floats(0, 50, allow_nan=False)), min_size=1,
                max_size=6),
       st.integers(1, 60), st.sampled_from(["hold", "linear"]))
def test_values_within_keyframe_range(frames: list[tuple[float, float]], steps: int, interp: str) -> None:
    s = Schedule(tuple(sorted((Keyframe(w, p) for w, p in frames), key=lambda k: k.position or 0.0)))
    lo, hi = min(w for w, _ in frames), max(w for w, _ in frames)
    for v in s.values(steps, interp):
        assert lo - 1e-9 <= v <= hi + 1e-9
    assert parse_schedule(s.format()) == s


def run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    schedule_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["schedule", *argv])
    out = io.StringIO()
    return schedule_cli.run(args, out), out.getvalue()


def test_cli_json() -> None:
    rc, text = run_cli("a <lora:x:te=0.1@1,0.6@6:lbw=INS> b <lyco:y:1:stop=2:foo=1>", "--steps", "8",
                       "--hires-steps", "4", "--json")
    data = json.loads(text)
    assert rc == 1  # the unknown key is a warning
    assert data["prompt"] == "a  b "
    x, y = data["networks"]
    assert x["base"]["te"] == [.1] * 5 + [.6] * 3
    assert x["base"]["change_points"] == [1, 6]
    assert x["lbw"]["weights"]["IN05"] == 0 and x["lbw"]["weights"]["IN04"] == 1
    assert len(x["hires"]["unet"]) == 4
    assert y["base"]["unet"] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert y["unknown"] == {"foo": "1"}
    assert any("foo" in w for w in data["warnings"])


def test_cli_text_and_clean_exit() -> None:
    rc, text = run_cli("<lora:x:0.5:in=0>", "--steps", "3")
    assert rc == 0
    assert "<lora:x:0.5:in=0>" in text and "unet" in text and "mid" in text


def test_cli_reports_out_of_range_and_bad_steps() -> None:
    rc, text = run_cli("<lora:x:0@1,1@30:start=9>", "--steps", "5", "--json")
    warnings = json.loads(text)["warnings"]
    assert rc == 1 and any("after the last step" in w for w in warnings)
    assert any("start=9" in w for w in warnings)
    rc, _ = run_cli("<lora:x:1>", "--steps", "0")
    assert rc == 2


def test_cli_user_presets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    presets = tmp_path / "p.txt"
    presets.write_text("# mine\nMINE:" + ",".join(["0.5"] * 12) + "\nBAD:1,2\n", encoding="utf-8")
    rc, text = run_cli("<lora:x:1:lbw=MINE>", "--steps", "2", "--json", "--presets", str(presets))
    data = json.loads(text)
    assert data["networks"][0]["lbw"]["weights"]["IN04"] == 0.5
    assert any("BAD" in w for w in data["warnings"])
