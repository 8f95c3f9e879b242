"""The published numbers beside which `cl-report --ref` puts a table (references.yaml) and the band a
faithful reproduction should land in: an explicit one where references.yaml gives it (`band`, `band_til`:
"18-22", ">= 97.5"), else one drawn around the published mean from the spreads (`reference_band`)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import UserError

_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*(>=|<=)\s*(-?\d+(?:\.\d+)?)\s*$")


def reference_band(ref_std: float | None, row_std: float, n: int) -> float:
    """Half-width of the band around a published mean that a faithful reproduction should land in.

    Twice the paper's std over seeds, or twice our own standard error if that is wider (few seeds,
    noisy method), but never under 1 accuracy point (papers round; data pipelines differ slightly).
    """
    own = 2 * row_std / math.sqrt(n) if n > 1 and not math.isnan(row_std) else 0.0
    return max(2 * (ref_std or 0.0), own, 1.0)


def parse_band(text: str) -> tuple[float, float]:
    """An explicit band as (low, high): "18-22" -> (18, 22), ">= 97.5" -> (97.5, inf), "<= 5" -> (-inf, 5)."""
    if m := _RANGE.match(str(text)):
        low, high = float(m[1]), float(m[2])
        if low <= high:
            return low, high
    elif m := _BOUND.match(str(text)):
        return (float(m[2]), math.inf) if m[1] == ">=" else (-math.inf, float(m[2]))
    raise ValueError(f"band {text!r}: expected 'LOW-HIGH', '>= X' or '<= X'")


def band_label(band: tuple[float, float]) -> str:
    """How the table shows an explicit band: 18-22, ≥ 97.5."""
    low, high = band
    if math.isinf(high):
        return f"≥ {low:g}"
    return f"≤ {high:g}" if math.isinf(low) else f"{low:g}-{high:g}"


def lands(mean: float, std: float, n: int, ref: float | None, ref_std: float | None,
          band: tuple[float, float] | None) -> bool:
    """Whether a row's mean lands where a faithful reproduction should: inside the explicit band if one is
    given, else within `reference_band` of the published mean."""
    if band is not None:
        return band[0] <= mean <= band[1]
    return abs(mean - ref) <= reference_band(ref_std, std, n)


REFERENCES_FILE = Path(__file__).with_name("references.yaml")


def load_references() -> dict:
    """references.yaml with every band parsed into (low, high): a malformed one (an edited file) is one line
    naming it."""
    import yaml  # read beside this module: importlib.resources fails on namespace packages (3.11)

    refs = yaml.safe_load(REFERENCES_FILE.read_text(encoding="utf-8")) or {}
    for method, datasets in refs.items():
        for dataset, entry in (datasets or {}).items():
            for key in ("band", "band_til"):
                if key in entry:
                    try:
                        entry[key] = parse_band(entry[key])
                    except ValueError as e:
                        raise UserError(f"{REFERENCES_FILE}: {method}.{dataset}.{key}: {e}") from None
    return refs
