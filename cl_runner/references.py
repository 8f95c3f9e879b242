"""The published numbers beside which `cl-report --ref` puts a table (references.yaml) and the band a
faithful reproduction should land in."""
from __future__ import annotations

import math
from pathlib import Path


def reference_band(ref_std: float | None, row_std: float, n: int) -> float:
    """Half-width of the band around a published mean that a faithful reproduction should land in.

    Twice the paper's std over seeds, or twice our own standard error if that is wider (few seeds,
    noisy method), but never under 1 accuracy point (papers round; data pipelines differ slightly).
    """
    own = 2 * row_std / math.sqrt(n) if n > 1 and not math.isnan(row_std) else 0.0
    return max(2 * (ref_std or 0.0), own, 1.0)


def load_references() -> dict:
    import yaml  # read beside this module: importlib.resources fails on namespace packages (3.11)

    return yaml.safe_load(Path(__file__).with_name("references.yaml").read_text(encoding="utf-8")) or {}
