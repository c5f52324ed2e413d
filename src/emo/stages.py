"""Per-stage metadata of torchvision ResNets: names, modules, channels and reductions.

The method of Najid & Chahyati (EECSI 2018) attaches a branch to each of five stages:
L0 is the stem after the max-pool, L1 to L4 are ``layer1`` to ``layer4``.
"""

from dataclasses import dataclass

STAGE_NAMES = ("L0", "L1", "L2", "L3", "L4")


@dataclass(frozen=True)
class StageInfo:
    """One stage: its name, the torchvision module that ends it, channels and stride."""

    name: str
    module: str
    channels: int
    reduction: int


# Output widths of layer1..layer4: basic blocks keep 64..512, bottlenecks expand by 4.
_BASIC_WIDTHS = (64, 128, 256, 512)
_BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)

ARCHITECTURES = {
    "resnet18": _BASIC_WIDTHS,
    "resnet34": _BASIC_WIDTHS,
    "resnet50": _BOTTLENECK_WIDTHS,
    "resnet101": _BOTTLENECK_WIDTHS,
    "resnet152": _BOTTLENECK_WIDTHS,
}


def validate_arch(arch: str) -> str:
    """Return ``arch`` if it is a supported torchvision ResNet, else raise ValueError."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


def stage_infos(arch: str) -> tuple[StageInfo, ...]:
    """Return the five stages of ``arch`` in order L0..L4.

    Example:
        >>> [s.channels for s in stage_infos("resnet101")]
        [64, 256, 512, 1024, 2048]
    """
    widths = ARCHITECTURES[validate_arch(arch)]
    stem = StageInfo("L0", "maxpool", 64, 4)
    layers = [StageInfo(f"L{i}", f"layer{i}", widths[i - 1], 4 * 2 ** (i - 1)) for i in range(1, 5)]
    return (stem, *layers)


def parse_stages(text: str) -> tuple[str, ...]:
    """Parse a comma-separated stage list such as ``"L0,L3,L4"`` into canonical order.

    Raises ValueError naming an unknown or repeated stage.
    """
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"no stages in {text!r}; give a comma-separated subset of {','.join(STAGE_NAMES)}")
    unknown = [name for name in names if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; valid stages are {','.join(STAGE_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"stage list {text!r} repeats a stage")
    return tuple(name for name in STAGE_NAMES if name in names)
