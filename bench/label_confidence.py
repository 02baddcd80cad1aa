"""Label confidence against label truth on every variant of ``bench/robustness.py`` and ``bench/beyond.py``.

Issue 10 asks that levels are never confidently wrong. For each variant
(the union of both benches' names, built as they build it) this runs the
built-in segmentation only (no measurement, no Genant) and counts the
variants whose L1-L4 are all labelled right (:func:`bench.robustness.level_check`)
or not, and whose lowest L1-L4 label confidence is under
:data:`bench.segmentation.UNCERTAIN` (flagged uncertain in the report) or
not. Wrong and not flagged is the case that must not happen; right but
flagged is its cost. Each variant in those two cells is listed.

Usage: python bench/label_confidence.py [--only PATTERN]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import beyond, robustness  # noqa: E402
from bench.segmentation import UNCERTAIN  # noqa: E402
from osteonode.anatomy import VERTEBRA_IDS  # noqa: E402
from osteonode.segment.backends import builtin  # noqa: E402

log = logging.getLogger("bench.label_confidence")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="PATTERN", help=robustness.ONLY_HELP)
    args = parser.parse_args(argv)
    # (labels right, flagged uncertain) -> variant names
    cells: dict[tuple[bool, bool], list[str]] = {(r, f): [] for r in (True, False) for f in (False, True)}
    for variant in beyond.every_variant(args.only):
        seg = builtin(variant.volume)
        right = all(state == "ok" for state in robustness.level_check(variant, seg.bodies).values())
        flagged = min(seg.confidence.get(VERTEBRA_IDS[n], 0.0) for n in robustness.LEVELS) < UNCERTAIN
        cells[(right, flagged)].append(variant.name)
        log.info("%s: %s, %s", variant.name, "right" if right else "wrong", "flagged" if flagged else "confident")
    print(f"{sum(map(len, cells.values()))} variants: right and confident {len(cells[(True, False)])}, "
          f"right but flagged uncertain {len(cells[(True, True)])}, "
          f"wrong and flagged uncertain {len(cells[(False, True)])}, "
          f"wrong and confident {len(cells[(False, False)])}")
    print("wrong and confident:", ", ".join(cells[(False, False)]) or "none")
    print("right but flagged uncertain:", ", ".join(cells[(True, True)]) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
