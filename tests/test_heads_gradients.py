"""The closed-form gradient of the branch heads against autograd's, on the same mini-batch."""

import pytest
import torch
import torch.nn.functional as F

from emo.heads.gradients import set_branch_gradients
from emo.heads.model import StackedHeads

WIDTHS = {"L0": 64, "L2": 128, "L4": 512}


def _batch(seed: int, rows: int = 32, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    features = {name: torch.randn(rows, width, generator=generator) for name, width in WIDTHS.items()}
    return features, torch.randint(0, classes, (rows,), generator=generator)


def _autograd_gradients(model: StackedHeads, features, labels) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model.branch_logits(features, standardized=True)
    loss = sum(F.cross_entropy(values, labels) for values in logits.values())
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _closed_form_gradients(model: StackedHeads, features, labels) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = set_branch_gradients(model, features, labels)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("fusion", "dropout"), [("branches", 0.0), ("branches", 0.5), ("concat", 0.0),
                                                 ("concat", 0.3)])
def test_closed_form_gradient_equals_autograd(fusion, dropout):
    torch.manual_seed(0)
    model = StackedHeads(WIDTHS, num_classes=6, dropout=dropout, fusion=fusion).train()
    features, labels = _batch(seed=1)

    # Dropout draws its masks from the global generator, in branch order on both paths.
    torch.manual_seed(7)
    expected_loss, expected = _autograd_gradients(model, features, labels)
    torch.manual_seed(7)
    loss, gradients = _closed_form_gradients(model, features, labels)

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert gradients.keys() == expected.keys()
    assert {name.split(".")[-2] for name in gradients} == {"linear"}  # the stacking logits get none
    for name, value in expected.items():
        torch.testing.assert_close(gradients[name], value, rtol=1e-5, atol=1e-7)


def test_closed_form_gradient_of_one_sample_per_class():
    # A batch where every row has another label still gives each class its own row of the gradient.
    torch.manual_seed(0)
    model = StackedHeads({"L4": 16}, num_classes=4).train()
    features = {"L4": torch.randn(4, 16)}
    labels = torch.arange(4)
    _, expected = _autograd_gradients(model, features, labels)
    _, gradients = _closed_form_gradients(model, features, labels)
    for name, value in expected.items():
        torch.testing.assert_close(gradients[name], value, rtol=1e-5, atol=1e-7)


def test_closed_form_loss_is_nan_for_nan_features():
    model = StackedHeads({"L4": 8}, num_classes=3).train()
    features = {"L4": torch.full((2, 8), float("nan"))}
    loss = set_branch_gradients(model, features, torch.tensor([0, 1]))
    assert loss != loss  # NaN, which the training loop turns into a TrainingError
