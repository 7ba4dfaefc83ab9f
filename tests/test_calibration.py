"""Calibrated probabilities, conformal prediction sets and abstention, on real data (scikit-learn's digits)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from exporters.calibration import (Calibration, apply_temperature, conformal_threshold, expected_calibration_error,
                                   fit_calibration, fit_temperature, prediction_set_mask, risk_coverage, set_report,
                                   threshold_for_accuracy, uniform_from_digest)


@pytest.fixture(scope="module")
def digits_split():
    """A modest model (150 training images, default L2): underconfident and 91% accurate, so the
    prediction sets have to adapt and the temperature has work to do."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    train, rest = idx[:150], idx[150:]
    model = LogisticRegression(C=1.0, max_iter=2000).fit(x[train] / 16, y[train])
    return model, x[rest] / 16, y[rest]


def test_temperature_scaling_halves_the_ece_of_an_underconfident_model_on_held_out_digits(digits_split):
    model, x, y = digits_split
    probs = model.predict_proba(x)
    cal, test = slice(0, 600), slice(600, None)
    before = expected_calibration_error(probs[test], y[test])
    temperature = fit_temperature(probs[cal], y[cal])
    after = expected_calibration_error(apply_temperature(probs[test], temperature), y[test])
    assert temperature < 1  # underconfident: the fit sharpens
    assert before > 0.1 and after <= before / 2 and after <= 0.05, (before, after, temperature)


def test_prediction_sets_agree_with_mapies_aps(digits_split):
    """Against MAPIE's APS with the calibration draws it makes (its score is the cumulated mass minus
    u x the true class's, i.e. ours with 1 - u): every randomised set of ours (plus the top class,
    which MAPIE always keeps) holds MAPIE's set without the last label and lies inside MAPIE's set
    with it, image by image; a different
    threshold or set rule breaks that on some of these 1,047 images."""
    from mapie.classification import SplitConformalClassifier

    model, x, y = digits_split
    cal, test = slice(0, 600), slice(600, None)
    u_test = np.random.default_rng(4).random(len(y) - 600)
    for coverage in (0.9, 0.95):
        mapie = SplitConformalClassifier(estimator=model, confidence_level=coverage, conformity_score="aps",
                                         prefit=True, random_state=7)
        mapie.conformalize(x[cal], y[cal])
        _, without_last = mapie.predict_set(x[test], conformity_score_params={"include_last_label": False})
        _, with_last = mapie.predict_set(x[test], conformity_score_params={"include_last_label": True})
        u_cal = 1 - np.random.RandomState(7).uniform(size=600)
        qhat = conformal_threshold(model.predict_proba(x[cal]), y[cal], coverage, u_cal)
        ours = prediction_set_mask(model.predict_proba(x[test]), qhat, u_test)
        probs = model.predict_proba(x[test])
        top = probs == probs.max(1, keepdims=True)  # MAPIE never leaves a set empty; ours may
        assert ((ours | top) >= without_last[:, :, 0]).all() and (ours <= with_last[:, :, 0]).all()
        assert 0.1 < (ours.sum(1) != 1).mean() < 0.9  # the sets really adapt: not all singletons


@pytest.mark.parametrize("coverage", [0.9, 0.95])
def test_conformal_coverage_holds_over_many_random_splits(digits_split, coverage):
    """Randomised split conformal: target <= E[coverage] <= target + 1/(n+1) over the draw of the
    calibration set. 300 random splits, the mean within 3 standard errors of that band."""
    model, x, y = digits_split
    probs = model.predict_proba(x)
    rng = np.random.default_rng(1)
    n_cal, covered = 200, []
    for _ in range(300):
        idx = rng.permutation(len(y))
        cal, test = idx[:n_cal], idx[n_cal:]
        u = rng.random(len(y))
        qhat = conformal_threshold(probs[cal], y[cal], coverage, u[cal])
        covered.append(prediction_set_mask(probs[test], qhat, u[test])[np.arange(len(test)), y[test]].mean())
    mean, se = float(np.mean(covered)), float(np.std(covered) / math.sqrt(len(covered)))
    assert coverage - 3 * se <= mean <= coverage + 1 / (n_cal + 1) + 3 * se, (mean, se)


def test_a_threshold_picked_for_a_target_accuracy_reaches_it_on_its_data_and_answers_the_most(digits_split):
    model, x, y = digits_split
    probs = model.predict_proba(x)
    threshold = threshold_for_accuracy(probs, y, 0.97)
    answered = probs.max(1) >= threshold
    assert (probs.argmax(1)[answered] == y[answered]).mean() >= 0.97
    lower = probs.max(1)[~answered].max()  # the next lower threshold misses the target
    more = probs.max(1) >= lower
    assert (probs.argmax(1)[more] == y[more]).mean() < 0.97
    assert threshold_for_accuracy(probs, y, 1.01) is None


def test_risk_coverage_reports_accuracy_at_80_90_and_100_percent(digits_split):
    model, x, y = digits_split
    probs = model.predict_proba(x)
    rc = risk_coverage(probs, y)
    full = float((probs.argmax(1) == y).mean())
    assert rc["at_coverage"]["1.00"]["accuracy"] == pytest.approx(full)
    assert rc["at_coverage"]["0.80"]["accuracy"] >= rc["at_coverage"]["0.90"]["accuracy"] >= full
    assert rc["curve"]["coverage"][-1] == 1.0


def test_fitted_calibration_abstains_where_it_should_and_round_trips_through_json(digits_split):
    model, x, y = digits_split
    probs = model.predict_proba(x)
    cal = fit_calibration(probs[:600], y[:600], coverage=0.9, target_accuracy=0.97, max_set_size=2)
    calibrated = cal.apply(probs[600:])
    sets = cal.sets(calibrated, np.random.default_rng(2).random(len(calibrated)))
    abstained = cal.abstain(calibrated, sets)
    assert np.array_equal(abstained, (calibrated.max(1) < cal.abstain_below_confidence) | (sets.sum(1) > 2))
    assert 0 < abstained.mean() < 1
    assert Calibration.from_json(cal.to_json()) == cal
    tiny = fit_calibration(probs[:5], y[:5], coverage=0.95)  # 5 images cannot back a 95% promise
    assert math.isinf(tiny.qhat) and tiny.to_json()["qhat"] is None
    assert Calibration.from_json(tiny.to_json()) == tiny
    assert tiny.sets(tiny.apply(probs[:3]), np.full(3, 0.99)).all()  # so every class is in every set


def test_set_report_counts_coverage_per_class(digits_split):
    model, x, y = digits_split
    probs = model.predict_proba(x)
    cal = fit_calibration(probs[:600], y[:600], coverage=0.9)
    report = set_report(cal, probs[600:], y[600:], [str(i) for i in range(10)], np.random.default_rng(3).random(len(y) - 600))
    assert report["n"] == len(y) - 600 and set(report["per_class"]) == {str(i) for i in range(10)}
    assert sum(c["n"] * c["coverage"] for c in report["per_class"].values()) / report["n"] == pytest.approx(report["coverage"])


def test_one_image_always_gets_the_same_draw_and_draws_are_uniform():
    import hashlib

    draws = np.array([uniform_from_digest(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(4000)])
    assert uniform_from_digest(hashlib.sha256(b"7").hexdigest()) == draws[7]
    assert draws.min() >= 0 and draws.max() < 1
    assert np.histogram(draws, bins=10, range=(0, 1))[0].min() > 330  # 400 expected per bin


def test_a_validation_split_the_model_gets_all_right_does_not_drive_the_temperature_to_its_bound():
    """Twelve right answers at 0.9 cannot justify serving 1.0 for everything (T at 0.05)."""
    probs = np.tile([[0.9, 0.05, 0.05]], (12, 1))
    temperature = fit_temperature(probs, np.zeros(12, int))
    assert 0.3 < temperature < 1.0  # sharper, as the evidence says, but not to certainty
    assert apply_temperature(probs, temperature).max() < 0.999
