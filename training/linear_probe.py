"""The floor a recipe has to beat: a linear probe on the frozen pretrained backbone.

Frozen features of the same backbone at the same resolution (the centre crop the service sees),
standardised, then multinomial logistic regression whose C is chosen by an inner stratified CV on
the same training data only; scored on the same held-out fold or split as the recipe. A fine-tuning
recipe that does not beat this is not earning its epochs.
"""
from __future__ import annotations

import warnings

import numpy as np

from training.scoring.metrics import classification_scores

# Log-spaced C grid: from strong regularisation (small data, 1000+ dim features) to almost none.
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))


def frozen_features(spec, cfg, images, policy, device) -> np.ndarray:
    """Pooled embeddings of the pretrained backbone (its head untrained and unused), one row per image."""
    from training.data import augment
    from training.loop.steps import predict
    from training.model.classifier import build_classifier

    model, _ = build_classifier(spec, 2, cfg.weights, 0.0)
    _, embeddings = predict(model, augment.eval_crop(images, policy), device, cfg.batch_size * 2,
                            cfg.channels_last, cfg.amp)
    return embeddings


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 classes: list[str], seed: int) -> dict:
    """Scores on (test_x, test_y) of the probe fitted on (train_x, train_y), and the C the inner CV chose."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest = int(np.bincount(train_y, minlength=len(classes))[np.unique(train_y)].min())
    inner = min(5, smallest)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if inner >= 2:
            search = GridSearchCV(pipe, {"logisticregression__C": list(C_GRID)}, scoring="accuracy",
                                  cv=StratifiedKFold(inner, shuffle=True, random_state=seed))
            search.fit(train_x, train_y)
            fitted, c = search.best_estimator_, float(search.best_params_["logisticregression__C"])
        else:  # a class with one training image: no inner CV possible, take the grid's middle
            c = C_GRID[len(C_GRID) // 2]
            fitted = pipe.set_params(logisticregression__C=c).fit(train_x, train_y)
    probs = np.zeros((len(test_x), len(classes)), np.float32)
    probs[:, fitted.classes_] = fitted.predict_proba(test_x)
    return {**classification_scores(test_y, probs, classes), "C": c, "inner_folds": inner if inner >= 2 else 0}
