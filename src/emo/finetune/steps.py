"""Training steps: which parameters each variant trains, with which loss and optimizer.

Parameters are selected by module-name prefix (``layer4`` selects ``layer4.0.conv1.weight`` and
every other parameter below ``layer4``). Parameters outside a step's prefixes get
``requires_grad=False``, stay out of the optimizer, and their BatchNorm layers stay in eval mode
(see :meth:`FinetuneNet.train`).
"""

from dataclasses import dataclass

import torch

from emo.finetune.config import FinetuneConfig
from emo.finetune.models import PRETRAINED_MODULES, FinetuneNet
from emo.stages import STAGE_NAMES


@dataclass(frozen=True)
class TrainingStep:
    """One training step of a variant.

    Attributes:
        name: ``train`` for one-step variants, ``step1`` / ``step2`` for ``ensemble``.
        trainable: module-name prefixes whose parameters train in this step.
        loss_outputs: model outputs whose cross-entropy losses are summed.
        epochs: number of epochs.
        keep_start: whether the model as it enters the step competes for the best val epoch
            (as "epoch 0"), so a step that only makes things worse leaves the model unchanged.
    """

    name: str
    trainable: tuple[str, ...]
    loss_outputs: tuple[str, ...]
    epochs: int
    keep_start: bool = False


def variant_steps(config: FinetuneConfig, model: FinetuneNet) -> list[TrainingStep]:
    """Return the training steps of ``config.variant``.

    Example:
        >>> [step.name for step in variant_steps(config, model)]  # doctest: +SKIP
        ['step1', 'step2']
    """
    primary = (model.primary,)
    one_step = {
        "fc": ("fc",),
        "l4": ("layer4", "fc"),
        "full": (*PRETRAINED_MODULES, "fc"),
        "l4-dropout": ("layer4", "fc"),
        "skip": ("projections", "mix_logits", "layer4", "fc"),
    }
    if config.variant in one_step:
        return [TrainingStep("train", one_step[config.variant], primary, config.epochs)]
    # ensemble: step 1 trains the ResNet and every branch on the sum of the branch losses. Step 2
    # trains only the branches and the combining weights on the loss of the combined output.
    return [
        TrainingStep("step1", (*PRETRAINED_MODULES, "branches"), STAGE_NAMES, config.epochs),
        TrainingStep("step2", ("branches", "mix_logits"), primary, config.stack_epochs, keep_start=True),
    ]


def has_prefix(name: str, prefixes: tuple[str, ...]) -> bool:
    """Return whether parameter ``name`` is one of ``prefixes`` or lies below one of them."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def apply_step(model: FinetuneNet, step: TrainingStep) -> None:
    """Let exactly the parameters of ``step`` train."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(has_prefix(name, step.trainable))


def trainable_count(model: FinetuneNet, step: TrainingStep) -> int:
    """Return how many scalar parameters train in ``step``."""
    return sum(parameter.numel() for name, parameter in model.named_parameters() if has_prefix(name, step.trainable))


def build_optimizer(model: FinetuneNet, config: FinetuneConfig) -> torch.optim.SGD:
    """Return SGD with Nesterov momentum over the trainable parameters, in two groups.

    Parameters taken over from the loaded ResNet train at ``config.lr_backbone`` (group
    ``backbone``), the new modules at ``config.lr_new`` (group ``new``). A group without
    trainable parameters is left out.
    """
    groups = {"backbone": [], "new": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups["new" if has_prefix(name, model.new_modules) else "backbone"].append(parameter)
    learning_rates = {"backbone": config.lr_backbone, "new": config.lr_new}
    param_groups = [{"name": name, "params": params, "lr": learning_rates[name]}
                    for name, params in groups.items() if params]
    return torch.optim.SGD(param_groups, lr=config.lr_new, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)
