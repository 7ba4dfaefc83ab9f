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


def label_budget_medians(shift: str = "digits") -> dict[str, dict[float, float]]:
    """strategy -> budget share -> median (over seeds) shifted-test accuracy of what served after the pass."""
    import statistics

    cells = json.loads(ROOT.joinpath("bench/results/label_budget.json").read_text())["cells"]
    by: dict[str, dict[float, list[float]]] = {}
    for c in cells:
        if c["shift"] == shift and not c.get("flip") and c["strategy"] not in ("before", "all") and c["budget_share"] < 1:
            by.setdefault(c["strategy"], {}).setdefault(float(c["budget_share"]), []).append(c["production_accuracy"])
    return {s: {b: statistics.median(v) for b, v in budgets.items()} for s, budgets in by.items()}


def test_the_default_review_strategy_is_the_one_the_label_budget_benchmark_shows_best():
    """The service's default is the strategy with the best mean over the measured budgets (median of
    seeds) on the digits shift, where the loop recovers; the README quotes its 10% figure."""
    from service.settings import ServiceSettings

    medians = label_budget_medians()
    assert {"random", "margin", "entropy", "novelty"} <= set(medians)
    best = max(medians, key=lambda s: sum(medians[s].values()) / len(medians[s]))
    default = ServiceSettings.model_fields["review_strategy"].default
    assert default == best, {s: round(sum(m.values()) / len(m), 4) for s, m in medians.items()}
    assert quoted_percent_beside("label_budget.json") == round(100 * medians[best][0.1], 1)


def test_the_gpu_sizing_table_quotes_the_request_cost_benchmark():
    """README "Sizing a GPU node": decode CPU per image and event-loop CPU per request, and the rates
    they cap, are bench/request_cost.py's medians for the current code (its `head predict` column)."""
    text = " ".join(ROOT.joinpath("README.md").read_text().split())
    roles = json.loads(ROOT.joinpath("bench/results/request_cost.json").read_text())["summary"]["head predict"]["roles"]
    decode, loop = roles["decode"]["median"], roles["event_loop"]["median"]
    quoted = re.search(r"\| JPEG decode \+ resize \+ crop \| (\d+\.\d) ms per image \|.*?\| ~(\d+) images/s per core \|"
                       r".*?\| HTTP, routing, batching, records, the answer \| (\d+\.\d) ms per request \|.*?\| ~(\d+) requests/s per pod \|", text)
    assert quoted, "README's sizing table is not where this test looks"
    assert float(quoted.group(1)) == round(decode, 1) and float(quoted.group(3)) == round(loop, 1)
    assert int(quoted.group(2)) == round(1000 / decode, -1) and int(quoted.group(4)) == round(1000 / loop, -1)
