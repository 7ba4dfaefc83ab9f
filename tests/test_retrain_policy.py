"""The retrain decision policy, table-driven: every rule and its reason."""
from __future__ import annotations

import pytest

from training.retrain.policy import Decision, PolicyState, PolicyThresholds, decide, state_from_history

NOW = 1_000_000.0
T = PolicyThresholds(min_new_labels=50, cooldown_s=3600, severity_increase=0.0)


def report(status="no_drift", severity=0.0, p=0.5, fb_below=False, fb_n=0, fb_enough=False):
    return {
        "status": status, "drift_detected": status == "drift" if status != "insufficient_data" else None,
        "severity": severity, "combined_p_value": p, "alpha": 0.05, "reason": "12 predictions",
        "feedback": {"n": fb_n, "accuracy": 0.7 if fb_below else 0.95, "validation_accuracy": 0.95, "margin": 0.05,
                     "enough": fb_enough, "below_validation": fb_below},
    }


CASES = [
    # (name, report, state, new_labels, now, expected retrain, expected triggers, blocked, phrase in reasons)
    ("no drift, good feedback", report(fb_n=40, fb_enough=True), PolicyState(), 100, NOW, False, [], False, "no drift"),
    ("insufficient data", report("insufficient_data"), PolicyState(), 100, NOW, False, [], False, "insufficient data"),
    ("first drift for the model", report("drift", 6.0, 1e-6), PolicyState(), 100, NOW, True, ["drift"], False, "first drift"),
    ("drift worse than last check", report("drift", 6.0, 1e-6), PolicyState(last_severity=2.0), 100, NOW, True, ["drift"], False, "> 2.0"),
    ("drift not worse", report("drift", 2.0, 1e-2), PolicyState(last_severity=6.0), 100, NOW, False, [], False, "not worse"),
    ("feedback accuracy below validation", report(fb_below=True, fb_n=60, fb_enough=True), PolicyState(last_severity=9.0), 100,
     NOW, True, ["feedback_accuracy"], False, "below validation"),
    ("too few new labels", report("drift", 6.0, 1e-6), PolicyState(), 10, NOW, False, ["drift"], True, "only 10 new label"),
    ("cooldown", report("drift", 6.0, 1e-6), PolicyState(last_retrain_at=NOW - 60), 100, NOW, False, ["drift"], True, "cooldown"),
    ("cooldown over", report("drift", 6.0, 1e-6), PolicyState(last_retrain_at=NOW - 7200), 100, NOW, True, ["drift"], False, "new label"),
    ("both triggers", report("drift", 6.0, 1e-6, fb_below=True, fb_n=60, fb_enough=True), PolicyState(), 100, NOW, True,
     ["drift", "feedback_accuracy"], False, "drift detected"),
]


@pytest.mark.parametrize("name,rep,state,new_labels,now,retrain,triggers,blocked,phrase", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, rep, state, new_labels, now, retrain, triggers, blocked, phrase):
    d = decide(rep, state, new_labels, now, T)
    assert (d.retrain, d.triggers, d.blocked) == (retrain, triggers, blocked)
    assert any(phrase in r for r in d.reasons), d.reasons


def test_force_retrains_even_without_drift_or_labels():
    d = decide(report("insufficient_data"), PolicyState(last_retrain_at=NOW), 0, NOW, T, force=True)
    assert d == Decision(True, ["forced by the operator (--force)"], ["forced"])


def test_severity_increase_margin_is_required():
    d = decide(report("drift", 6.0, 1e-6), PolicyState(last_severity=5.5), 100, NOW, PolicyThresholds(50, 0, 1.0))
    assert not d.retrain and "not worse" in d.reasons[0]


def test_blocked_checks_are_not_the_severity_baseline():
    history = [
        {"at": 1.0, "model_version": "v1", "severity": 0.0, "decision": {"retrain": False, "blocked": False}},
        {"at": 2.0, "model_version": "v1", "severity": 8.0, "decision": {"retrain": False, "blocked": True}},
    ]
    assert state_from_history(history, "v1") == PolicyState(last_severity=0.0, last_retrain_at=None)


def test_history_gives_last_retrain_and_ignores_other_models_severity():
    history = [
        {"at": 1.0, "model_version": "v1", "severity": 7.0, "decision": {"retrain": True}, "outcome": {"status": "promoted"}},
        {"at": 5.0, "model_version": "v2", "severity": 0.0, "decision": {"retrain": False}},
    ]
    assert state_from_history(history, "v2") == PolicyState(last_severity=0.0, last_retrain_at=1.0)
    assert state_from_history(history, "v3").last_severity is None


def test_a_few_held_out_labels_of_the_new_traffic_weigh_as_much_as_the_original_test_split():
    """At a small label budget: 9 held-out labels beside 161 original test images. The challenger fixes
    3 of the champion's 4 mistakes on the new traffic and loses 2 of 161 on the old: pooled that is
    +0.006, under the margin; each source weighing half, it is promoted."""
    import numpy as np

    from training.retrain.gate import accuracy_by_source, promotion_verdict

    source = np.array(["original_test"] * 161 + ["feedback"] * 9)
    champion = np.ones(170, dtype=bool)
    champion[161:165] = False
    challenger = np.ones(170, dtype=bool)
    challenger[[0, 1, 161]] = False
    scores = [accuracy_by_source(c, source) for c in (champion, challenger)]
    assert scores[1]["holdout"]["pooled_accuracy"] - scores[0]["holdout"]["pooled_accuracy"] < 0.01
    promote, reasons = promotion_verdict(scores[0], scores[1], margin=0.01, tolerance=0.02)
    assert promote, reasons
    # and a challenger that only trades old accuracy for new beyond the tolerance is still kept out
    worse_old = challenger.copy()
    worse_old[2:6] = False
    assert not promotion_verdict(scores[0], accuracy_by_source(worse_old, source), margin=0.01, tolerance=0.02)[0]
