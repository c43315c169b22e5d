"""What a version must show before it is served, as TFX's evaluator blesses a model: absolute floors for
its kind of model, and no worse than the version it would replace.

Applied twice, to the same figures (the judge's confidence, smallest class share and, for conditional
models, accuracy on the class asked for): at export, to the evaluation's (training/export.py), and at the
quality gate, to what the service measured itself (service/lifecycle.py). A model's own recorded figures
cannot bless it: a collapsed run records collapsed figures, and would pass a gate that only compares
with them.
"""

from __future__ import annotations

import math
from typing import Mapping

from service.manifest import ModelEntry

FIGURES = ("confidence", "min_class_share", "conditional_accuracy")
CONFIDENCE_FLOOR = 0.5  # of its samples, the judge names at least half with confidence (real digits: 0.98)
CONDITIONAL_ACCURACY_FLOOR = 0.9  # a conditional model draws the digit asked for (the bundled: 0.995, 0.997)
CLASS_SHARE_FLOOR = 0.5  # its rarest class at least half a uniform share: no class dropped (mode collapse)
COMPARE_Z = 4.0  # standard errors of a difference of two proportions before a version counts as worse


def floors(entry: ModelEntry, classes: int) -> dict[str, float]:
    """The least each figure may be for this kind of model; `classes`: how many its judge tells apart."""
    least = {"confidence": CONFIDENCE_FLOOR, "min_class_share": CLASS_SHARE_FLOOR / classes}
    if entry.conditional:
        least["conditional_accuracy"] = CONDITIONAL_ACCURACY_FLOOR
    return least


def below_floors(entry: ModelEntry, measured: Mapping[str, float], classes: int) -> list[str]:
    """Each figure under its floor, said with both numbers."""
    return [f"{key} {measured[key]:.4f} is below the floor of {least:.4f} for "
            f"{'conditional' if entry.conditional else 'unconditional'} models"
            for key, least in floors(entry, classes).items() if key in measured and measured[key] < least]


def worse_than(new: Mapping[str, float], new_samples: int, old: Mapping[str, float], old_samples: int,
               old_version: str) -> list[str]:
    """Each figure where the new version falls short of the old by more than COMPARE_Z standard errors
    of the difference (plus a sample's worth): refused as worse, not as noise."""
    worse = []
    for key in FIGURES:
        if new.get(key) is None or old.get(key) is None:
            continue
        p, q = old[key], new[key]
        margin = COMPARE_Z * math.sqrt(p * (1 - p) / old_samples + q * (1 - q) / new_samples) \
            + 1 / min(old_samples, new_samples)
        if q < p - margin:
            worse.append(f"{key} {q:.4f} against {p:.4f} for version {old_version}, which it would replace")
    return worse
