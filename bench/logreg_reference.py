"""Reference accuracy of scikit-learn's LogisticRegression on one cached stage.

Fits on the train split of a feature cache and reports test accuracy and macro recall, once on
the raw features with scikit-learn's defaults and once after standardization (as the branch
heads of ``emo fit-heads`` do).

Usage:
    python bench/logreg_reference.py CACHE.h5 [--stage L4]
"""

import argparse
import json
import time
import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emo.cache import FeatureCache
from emo.evaluate.metrics import compute_metrics


def fit_and_score(estimator, cache: FeatureCache, stage: str) -> dict:
    """Fit ``estimator`` on train rows of ``stage`` and return test metrics and fit seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(cache.features(stage, "train"), cache.labels("train"))
    seconds = time.perf_counter() - start
    predicted = estimator.predict(cache.features(stage, "test"))
    metrics = compute_metrics(cache.labels("test"), predicted, cache.classes)
    return {"accuracy": metrics["accuracy"], "macro_recall": metrics["macro_recall"], "fit_seconds": seconds,
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--stage", default="L4")
    args = parser.parse_args()
    with FeatureCache(args.cache) as cache:
        results = {
            "defaults": fit_and_score(LogisticRegression(), cache, args.stage),
            "standardized": fit_and_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                                          cache, args.stage),
        }
    print(json.dumps({"cache": args.cache, "stage": args.stage, **results}, indent=2))


if __name__ == "__main__":
    main()
