"""Figures the README quotes come from results files the benchmarks wrote, and match them."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quoted_percent_beside(results_file: str) -> float:
    """The percentage the README prints right before it names `results_file`."""
    text = " ".join(ROOT.joinpath("README.md").read_text().split())
    match = re.search(r"(\d+\.\d)%[^%]{0,120}?`bench/results/" + re.escape(results_file) + "`", text)
    assert match, f"README quotes no percentage beside bench/results/{results_file}"
    return float(match.group(1))


def test_the_accurate_and_default_recipe_figures_match_their_results_files():
    for name in ("hymenoptera_quality_lite2.json", "hymenoptera_quality.json"):
        measured = json.loads(ROOT.joinpath("bench/results", name).read_text())["test_accuracy"]["mean"]
        assert quoted_percent_beside(name) == round(100 * measured, 1), name
