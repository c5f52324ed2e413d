"""The gradient of the branch losses in closed form, without autograd.

A branch is a linear layer under a softmax cross-entropy, whose gradient has a closed form.
With inputs X [B, C] (after dropout), logits Z = X W^T + b [B, K], probabilities P = softmax(Z)
and one-hot labels Y [B, K], the mean loss over the batch has

    dL/dZ = (P - Y) / B,   dL/dW = (dL/dZ)^T X [K, C],   dL/db = sum over the batch of dL/dZ [K].

Computing this directly skips building autograd's graph and running its backward pass, which
for heads this small take about a third of a mini-batch step. The result is autograd's up to
floating-point rounding; ``tests/test_heads_gradients.py`` compares the two.
"""

import torch
import torch.nn.functional as F

from emo.heads.model import StackedHeads


@torch.no_grad()
def set_branch_gradients(model: StackedHeads, standardized: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    """Set ``.grad`` of every branch's linear layer to the gradient of the summed branch losses.

    The summed loss is the sum over branches of each branch's mean cross-entropy, so each
    branch gets the gradient of its own loss. Dropout, where the model has it, draws its masks
    in branch order, as the model's forward pass does.

    Args:
        model: the heads, in training mode for dropout to apply.
        standardized: stage features {stage: [B, C]} already standardized with
            :meth:`StackedHeads.standardization`, as the training rows are.
        labels: class indices [B].

    Returns:
        The summed loss, for logging and for the finiteness check before the optimizer steps.

    Example:
        >>> model = StackedHeads({"L4": 2048}, num_classes=8)
        >>> loss = set_branch_gradients(model, {"L4": torch.randn(32, 2048)}, torch.randint(0, 8, (32,)))
        >>> model.branches["L4"].linear.weight.grad.shape
        torch.Size([8, 2048])
    """
    inputs = model.branch_inputs(standardized)
    rows = torch.arange(len(labels))
    total = 0.0
    for name, head in model.branches.items():
        x = head.dropout(inputs[name])  # [B, C]
        log_probs = torch.log_softmax(torch.addmm(head.linear.bias, x, head.linear.weight.t()), dim=1)  # [B, K]
        total += F.nll_loss(log_probs, labels).item()

        grad_logits = log_probs.exp_()  # P [B, K], in place of the log-probabilities
        grad_logits[rows, labels] -= 1.0  # P - Y
        grad_logits /= len(labels)  # dL/dZ
        head.linear.weight.grad = grad_logits.t() @ x  # [K, C]
        head.linear.bias.grad = grad_logits.sum(dim=0)  # [K]
    return total
