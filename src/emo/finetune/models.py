"""The six fine-tuned ResNet variants of Najid & Chahyati (EECSI 2018).

Every model keeps torchvision's module names for the pretrained parts (``conv1``, ``bn1``,
``layer1`` .. ``layer4``) and adds new modules under their own names (``fc``, ``projections``,
``branches``, ``mix_logits``). ``forward`` returns a dict of class logits [B, K] per output,
primary output first, so the same training, evaluation and DataParallel/DDP code serves all six.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from emo.finetune.config import VARIANTS
from emo.stages import STAGE_NAMES, stage_infos

# Parameters, in every variant, that come from the loaded ResNet rather than being created new.
PRETRAINED_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


class FinetuneNet(nn.Module):
    """A ResNet trunk (stem and layer1..layer4) whose frozen BatchNorm layers stay in eval mode.

    Subclasses set ``primary`` (the name of the main output) and ``new_modules`` (the modules
    created for fine-tuning, trained at the new-layer learning rate).
    """

    primary: str
    new_modules: tuple[str, ...]

    def __init__(self, resnet: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Return the L0 feature map: convolution, BatchNorm, ReLU and max-pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(images))))

    def train(self, mode: bool = True) -> "FinetuneNet":
        """Set training mode, but keep every BatchNorm whose parameters are frozen in eval mode.

        A frozen BatchNorm in training mode would still normalize with batch statistics and
        update its running mean and variance, so the "frozen" part would keep changing.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                is_frozen = not any(parameter.requires_grad for parameter in module.parameters(recurse=False))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and is_frozen:
                    module.eval()
        return self

    def combination_weights(self) -> dict[str, float] | None:
        """Return the learned weights of a weighted average inside the model, if it has one."""
        return None


class ClassifierNet(FinetuneNet):
    """ResNet with a new linear classifier: the ``fc``, ``l4``, ``full`` and ``l4-dropout`` variants."""

    new_modules = ("fc",)

    def __init__(self, resnet: nn.Module, num_classes: int, *, name: str):
        super().__init__(resnet)
        self.primary = name
        self.fc = nn.Linear(resnet.fc.in_features, num_classes)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return {self.primary: self.fc(x.mean(dim=(2, 3)))}


def add_block_dropout(layer: nn.Sequential, p: float) -> None:
    """Insert ``Dropout2d(p)`` into every residual block of ``layer``, before its last convolution.

    In a bottleneck block the dropout sits between the 3x3 convolution (after its BatchNorm and
    ReLU) and the following 1x1 convolution. In a basic block it sits between the two 3x3
    convolutions. The
    dropout becomes element 0 of an ``nn.Sequential`` that replaces the convolution, so the
    convolution's state-dict keys gain a ``.1`` (``conv3.weight`` -> ``conv3.1.weight``).
    """
    for block in layer:
        if isinstance(block, Bottleneck):
            block.conv3 = nn.Sequential(nn.Dropout2d(p), block.conv3)
        elif isinstance(block, BasicBlock):
            block.conv2 = nn.Sequential(nn.Dropout2d(p), block.conv2)
        else:
            raise TypeError(f"unexpected residual block type {type(block).__name__}")


class SkipNet(FinetuneNet):
    """ResNet-skip: L0, L1, L2 projected to L3's shape and averaged with L3 before layer4.

    Each projection is a strided 1x1 convolution with BatchNorm, like ResNet's own downsampling
    shortcuts. The average weights are a softmax over ``mix_logits``, so they are non-negative
    and sum to one; zero logits start as a plain mean.

    Example:
        >>> import torchvision
        >>> model = SkipNet(torchvision.models.resnet18(), 6, arch="resnet18")
        >>> model(torch.zeros(2, 3, 64, 64))["ResNet-skip"].shape
        torch.Size([2, 6])
    """

    primary = "ResNet-skip"
    new_modules = ("projections", "mix_logits", "fc")
    mixed_stages = ("L0", "L1", "L2", "L3")

    def __init__(self, resnet: nn.Module, num_classes: int, *, arch: str):
        super().__init__(resnet)
        infos = {info.name: info for info in stage_infos(arch)}
        target = infos["L3"]
        # A 1x1 convolution with stride s maps H to ceil(H / s), as the stride-2 3x3 convolutions
        # of layer2 and layer3 do, so the projected maps match L3's size for any input size.
        self.projections = nn.ModuleDict({
            name: nn.Sequential(
                nn.Conv2d(infos[name].channels, target.channels, kernel_size=1,
                          stride=target.reduction // infos[name].reduction, bias=False),
                nn.BatchNorm2d(target.channels),
            )
            for name in self.mixed_stages[:-1]
        })
        self.mix_logits = nn.Parameter(torch.zeros(len(self.mixed_stages)))
        self.fc = nn.Linear(resnet.fc.in_features, num_classes)

    def mix_weights(self) -> torch.Tensor:
        """Return the weights [4] of L0, L1, L2, L3 in the average."""
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        l0 = self.stem(images)
        l1 = self.layer1(l0)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        maps = [self.projections["L0"](l0), self.projections["L1"](l1), self.projections["L2"](l2), l3]
        mixed = torch.einsum("s,sbchw->bchw", self.mix_weights().to(l3.dtype), torch.stack(maps))
        return {self.primary: self.fc(self.layer4(mixed).mean(dim=(2, 3)))}

    def combination_weights(self) -> dict[str, float]:
        return dict(zip(self.mixed_stages, self.mix_weights().tolist()))


class EnsembleNet(FinetuneNet):
    """ResNet-ensemble: a branch (global average pooling and a linear layer) on each of L0..L4.

    The ensemble output is a weighted average of the branch softmax outputs, with weights
    from a softmax over ``mix_logits``. Its logits are the log of that average, so that softmax
    and cross-entropy treat it like any other output.

    Example:
        >>> import torchvision
        >>> model = EnsembleNet(torchvision.models.resnet18(), 6, arch="resnet18")
        >>> list(model(torch.zeros(2, 3, 64, 64)))
        ['ResNet-ensemble', 'L0', 'L1', 'L2', 'L3', 'L4']
    """

    primary = "ResNet-ensemble"
    new_modules = ("branches", "mix_logits")

    def __init__(self, resnet: nn.Module, num_classes: int, *, arch: str):
        super().__init__(resnet)
        channels = {info.name: info.channels for info in stage_infos(arch)}
        self.branches = nn.ModuleDict({name: nn.Linear(channels[name], num_classes) for name in STAGE_NAMES})
        self.mix_logits = nn.Parameter(torch.zeros(len(STAGE_NAMES)))

    def mix_weights(self) -> torch.Tensor:
        """Return the weights [5] of the branches L0..L4 in the average."""
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(images)
        maps = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        branch_logits = {name: self.branches[name](fmap.mean(dim=(2, 3))) for name, fmap in zip(STAGE_NAMES, maps)}
        probabilities = torch.stack([F.softmax(logits.float(), dim=1) for logits in branch_logits.values()])  # [5, B, K]
        # A product and a sum rather than einsum, which autocast would run in bfloat16.
        mixed = (self.mix_weights()[:, None, None] * probabilities).sum(dim=0)  # [B, K]
        return {self.primary: torch.log(mixed.clamp_min(1e-12)), **branch_logits}

    def combination_weights(self) -> dict[str, float]:
        return dict(zip(STAGE_NAMES, self.mix_weights().tolist()))


def build_model(variant: str, resnet: nn.Module, num_classes: int, *, arch: str, dropout: float = 0.5,
                seed: int = 0) -> FinetuneNet:
    """Build the model of ``variant`` around a loaded torchvision ResNet.

    Args:
        variant: ``fc``, ``l4``, ``full``, ``l4-dropout``, ``skip`` or ``ensemble``.
        resnet: the ResNet whose stem and layers the model takes over (its ``fc`` is dropped).
        num_classes: number of classes K.
        arch: the ResNet's name, which decides channel counts and strides.
        dropout: the ``Dropout2d`` probability of ``l4-dropout``.
        seed: seed of the initialisation of the new modules.

    Returns:
        The model, in training mode, with every parameter trainable.

    Example:
        >>> import torchvision
        >>> model = build_model("l4", torchvision.models.resnet18(), 6, arch="resnet18")
        >>> model.primary
        'ResNet-L4'
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant == "skip":
            return SkipNet(resnet, num_classes, arch=arch)
        if variant == "ensemble":
            return EnsembleNet(resnet, num_classes, arch=arch)
        if variant == "l4-dropout":
            add_block_dropout(resnet.layer4, dropout)
        return ClassifierNet(resnet, num_classes, name=VARIANTS[variant])
