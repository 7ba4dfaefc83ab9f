"""When to retrain: a pure function of the drift report, the audit history and the clock.

Retrain when drift is detected and worse than at the last check, or when feedback accuracy fell
below validation accuracy by a margin; never with too little data, too few new labels, or inside
the cooldown after the previous retrain. A check that wanted to retrain but was held back (labels,
cooldown) is not a baseline: otherwise a persisting drift that had to wait for labels would never
look "worse" again and the loop would stall.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PolicyThresholds:
    min_new_labels: int = 50
    cooldown_s: float = 3600.0
    severity_increase: float = 0.0


@dataclass(frozen=True)
class PolicyState:
    """What the audit log remembers: the baseline severity of this model, and the last retrain."""

    last_severity: float | None = None
    last_retrain_at: float | None = None


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)  # "drift", "feedback_accuracy", "forced"
    blocked: bool = False  # a trigger fired but labels/cooldown held the retrain back

    def to_json(self) -> dict:
        return asdict(self)


def state_from_history(records: list[dict], model_version: str) -> PolicyState:
    """Baseline = severity of the newest unblocked check of `model_version`; last retrain = newest that trained."""
    last_severity = last_retrain = None
    for r in reversed(records):
        d = r.get("decision") or {}
        # A retrain that crashed counts too: the cooldown keeps a failing job from hot-looping.
        if last_retrain is None and d.get("retrain"):
            last_retrain = r.get("at")
        if last_severity is None and r.get("model_version") == model_version and not d.get("blocked") and r.get("severity") is not None:
            last_severity = float(r["severity"])
    return PolicyState(last_severity, last_retrain)


def decide(report: dict, state: PolicyState, new_labels: int, now: float, thresholds: PolicyThresholds,
           force: bool = False) -> Decision:
    if force:
        return Decision(True, ["forced by the operator (--force)"], ["forced"])
    reasons, triggers = [], []
    severity = float(report.get("severity") or 0.0)
    if report["status"] == "insufficient_data":
        reasons.append(f"drift: insufficient data ({report.get('reason')})")
    elif report["drift_detected"]:
        base = state.last_severity
        if base is None or severity > base + thresholds.severity_increase:
            triggers.append("drift")
            reasons.append(f"drift detected (combined p {report['combined_p_value']:.2e}, severity {severity:.1f}"
                           + (f" > {base:.1f} at the last check)" if base is not None else "; first drift for this model)"))
        else:
            reasons.append(f"drift persists but is not worse than at the last check (severity {severity:.1f} <= {base:.1f})")
    else:
        reasons.append(f"no drift (combined p {report['combined_p_value']:.3f} >= alpha {report['alpha']})")
    fb = report["feedback"]
    if fb["below_validation"]:
        triggers.append("feedback_accuracy")
        reasons.append(f"feedback accuracy {fb['accuracy']:.3f} on {fb['n']} labels is below validation "
                       f"{fb['validation_accuracy']:.3f} by more than {fb['margin']}")
    elif fb["n"] and fb["enough"]:
        reasons.append(f"feedback accuracy {fb['accuracy']:.3f} on {fb['n']} labels is within {fb['margin']} of validation")
    if not triggers:
        return Decision(False, reasons)
    if state.last_retrain_at is not None and now - state.last_retrain_at < thresholds.cooldown_s:
        wait = thresholds.cooldown_s - (now - state.last_retrain_at)
        return Decision(False, reasons + [f"in cooldown: the last retrain was {now - state.last_retrain_at:.0f}s ago, "
                                          f"{wait:.0f}s to go"], triggers, blocked=True)
    if new_labels < thresholds.min_new_labels:
        return Decision(False, reasons + [f"only {new_labels} new label(s) since the last retrain; "
                                          f"{thresholds.min_new_labels} needed"], triggers, blocked=True)
    return Decision(True, reasons + [f"{new_labels} new label(s) since the last retrain"], triggers)
