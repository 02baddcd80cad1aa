"""The label and Genant lines of the robustness benches (``bench/robustness.py``, ``bench/beyond.py``)."""

from __future__ import annotations

from bench.robustness import genant_lines, labels_line


def _row(name: str, grades: dict, expected: dict, reference: int | None = None, borderline: tuple = (),
         labels: str = "ok", loss: float = 0.3, confidence: float = 0.9, offset: float = 0.0) -> dict:
    deformity = {"level": next(iter(expected)), "loss": loss, "kind": name[:5]} if expected else None
    return {"variant": name, "labels": dict.fromkeys(("L1", "L2", "L3", "L4"), labels), "grades": grades,
            "offset": dict.fromkeys(("L1", "L2", "L3", "L4"), offset),
            "truth": {"deformity": deformity, "expected_grade": expected}, "reference_grade": reference,
            "borderline": {n: n in borderline for n in grades},
            "confidence": dict.fromkeys(("L1", "L2", "L3", "L4"), confidence)}


def test_genant_lines_count_grades_against_nominal_reference_and_false_ones():
    rows = [
        _row("base", {"L1": 0, "L2": 0, "L3": 0, "L4": 0}, {}),
        _row("wedge30_L1", {"L1": 2, "L2": 0, "L3": 0, "L4": 0}, {"L1": 2}, reference=2),
        _row("wedge45_L3", {"L1": 2, "L2": 0, "L3": 1, "L4": 0}, {"L3": 3}, reference=3, borderline=("L1",),
             loss=0.45, offset=-80.0),
        _row("crush20_L3", {"L1": 0, "L2": 0, "L3": 0, "L4": 0}, {"L3": 1}, reference=1, loss=0.2),
        _row("core_L2-60", {"L1": 0, "L2": 1, "L3": 0, "L4": "."}, {}),
        _row("core_T12-L5-70", {"L1": None, "L2": 0, "L3": 0, "L4": 0}, {}),
    ]
    lines = {title: (ok, detail) for title, ok, detail in genant_lines(rows)}
    exact = next(v for k, v in lines.items() if k.startswith("Genant grade exact"))
    assert exact == (False, "exact 1/3; off by > 1 or ungraded: wedge45_L3 1 vs 3")
    clear = next(v for k, v in lines.items() if "outside the genant_borderline band" in k)
    assert clear == (False, "exact 1/2; within the band: exact 0/1")  # crush20_L3: on the 20 % limit
    by_class = next(v for k, v in lines.items() if "by deformity kind" in k)
    assert by_class == (False, "crush cores not darker: 0/1 (reference body 1/1); "
                               "wedge cores not darker: 1/1 (reference body 1/1); "
                               "wedge over 60 HU darker: 0/1 (reference body 1/1)")
    reference = next(v for k, v in lines.items() if "equal to that of the reference body" in k)
    assert reference[1].startswith("equal 1/3, off by more than one or ungraded 1")
    flagged = next(v for k, v in lines.items() if "say genant_borderline" in k)
    assert flagged[1].startswith("1/4; not: wedge45_L3 L3, crush20_L3 L3, core_L2-60 L2")
    false = next(v for k, v in lines.items() if "false grades" in k)
    assert false == (False, "2: wedge45_L3 L1=2, core_L2-60 L2=1")
    ungraded = next(v for k, v in lines.items() if "not graded" in k)
    assert ungraded == (False, "1: core_T12-L5-70 L1")
    assert labels_line(rows)[1:] == (True, "6/6")
    assert labels_line(rows + [_row("x", {}, {}, labels="L2")])[1:] == (False, "6/7; wrong: x (confident)")
    assert labels_line(rows + [_row("y", {}, {}, labels="<50%", confidence=0.4)])[1:] == (
        False, "6/7; wrong: y (uncertain)")
