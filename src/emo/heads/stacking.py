"""The logistic-regression meta-learner that stacks branch probabilities (``--stacking logreg``).

scikit-learn fits a multinomial logistic regression on the concatenated branch probabilities
[N, S*K] of the val split. Its coefficients are copied into the ``meta`` layer of
:class:`~emo.heads.model.StackedHeads`, so the run saves and loads like any other head run.
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from emo.errors import CacheError
from emo.heads.model import StackedHeads

# Logit of a class the val split lacks: the meta-learner never predicts it.
_ABSENT_CLASS_LOGIT = -1e4


@torch.no_grad()
def branch_probabilities(model: StackedHeads, features: dict[str, torch.Tensor]) -> np.ndarray:
    """Return the concatenated softmax outputs of all branches, [N, S*K] in branch-major order."""
    model.eval()
    logits = model.branch_logits(features)
    return torch.cat([torch.softmax(logits[name], dim=1) for name in model.branches], dim=1).numpy()


def fit_logreg_stacking(model: StackedHeads, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    """Fit the meta-learner of ``model`` on one split (the val split) and copy it into ``model.meta``.

    Args:
        model: a :class:`StackedHeads` built with ``stacking="logreg"`` and trained branches.
        features: stage features {stage: [N, C]} of the split to fit on.
        labels: class indices [N] of that split.

    Raises:
        CacheError: if the split contains fewer than two classes, so no classifier can be fit.

    Example:
        >>> fit_logreg_stacking(model, splits["val"].features, splits["val"].labels)  # doctest: +SKIP
    """
    targets = labels.numpy()
    present = np.unique(targets)
    if len(present) < 2:
        raise CacheError(f"the val split has {len(present)} class(es); the logreg stacking needs at least two "
                         "to fit on; use --stacking weighted or a larger val split")
    inputs = branch_probabilities(model, features)
    # lbfgs is deterministic, so the same branches give the same meta-learner.
    regression = LogisticRegression(max_iter=1000).fit(inputs, targets)

    weight, bias = _class_coefficients(regression, model.meta.out_features)
    with torch.no_grad():
        model.meta.weight.copy_(torch.from_numpy(weight))
        model.meta.bias.copy_(torch.from_numpy(bias))


def _class_coefficients(regression: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return weight [K, D] and bias [K] with one row per class index, from a fitted regression.

    scikit-learn keeps rows only for the classes it saw. When it saw two, it keeps a single row:
    the logit z of ``classes_[1]`` against ``classes_[0]``. Softmax over ``[0, z]`` equals that
    sigmoid, so the first class gets a zero row.
    """
    coef, intercept = regression.coef_, regression.intercept_
    if len(regression.classes_) == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, coef.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, _ABSENT_CLASS_LOGIT, dtype=np.float32)
    weight[regression.classes_] = coef
    bias[regression.classes_] = intercept
    return weight, bias
