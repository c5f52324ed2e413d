"""ResNet backbones: construction, weight loading and a forward pass that yields every stage.

Weights are given as a spec string: ``imagenet`` (torchvision's ImageNet-1k weights, through
torchvision's weights API and its cache), ``random`` (seeded initialisation, for tests and smoke
runs) or the path of a state dict file.
"""

import hashlib
import logging
import os
import pickle
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from emo.errors import WeightsError
from emo.stages import ARCHITECTURES, STAGE_NAMES, stage_infos, validate_arch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# IMAGENET1K_V1 are the original ResNet weights, the ones available to the 2018 paper.
IMAGENET_WEIGHTS_NAME = "IMAGENET1K_V1"
DOWNLOAD_TIMEOUT_S = 15


@dataclass(frozen=True)
class LoadedWeights:
    """Record of a backbone's weights: the spec, their source and the SHA-256 of the state dict."""

    spec: str
    source: str
    sha256: str


def build_resnet(arch: str, weights: str, *, seed: int = 0) -> tuple[nn.Module, LoadedWeights]:
    """Build a torchvision ResNet and load the weights named by ``weights``.

    Args:
        arch: a torchvision ResNet name, e.g. ``"resnet101"``.
        weights: ``"imagenet"``, ``"random"`` or the path of a state dict.
        seed: seed of the initialisation when ``weights`` is ``"random"``.

    Returns:
        The model in eval mode on the CPU, and a record of the weights. For a state dict file,
        the record's ``spec`` is its absolute path, and its ``source`` notes whether the file's
        classifier ``fc`` was ignored (extraction never uses it).

    Example:
        >>> model, record = build_resnet("resnet18", "random", seed=0)
        >>> record.spec
        'random'
    """
    validate_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None)
    source = f"random initialisation, seed {seed}"

    if weights == "imagenet":
        state_dict, source = _load_imagenet_state_dict(arch)
        model.load_state_dict(state_dict, strict=True)
    elif weights != "random":
        path = Path(weights).resolve()
        ignored = _load_state_dict_file(model, path, arch)
        weights = source = str(path)
        if ignored:
            source += f" ({ignored})"

    model.eval()
    return model, LoadedWeights(spec=weights, source=source, sha256=state_dict_sha256(model))


def state_dict_sha256(model: nn.Module) -> str:
    """Return a SHA-256 digest over the names and bytes of ``model``'s state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _imagenet_weights_enum(arch: str):
    return torchvision.models.get_model_weights(arch)[IMAGENET_WEIGHTS_NAME]


def _load_imagenet_state_dict(arch: str) -> tuple[dict, str]:
    """Load ImageNet weights from torchvision's cache, downloading them only if reachable."""
    enum = _imagenet_weights_enum(arch)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(enum.url)
    if not file.is_file():
        _download_or_fail(enum, file)
    _check_hub_file_hash(file, enum.url)
    return _load_tensors(file, fix=f"delete it, so that it is downloaded again from {enum.url}"), str(file)


def _check_hub_file_hash(file: Path, url: str) -> None:
    """Raise WeightsError unless the file's SHA-256 starts with the prefix in its name, as torch.hub checks.

    torchvision names its files ``ARCH-<first hex digits of the SHA-256>.pth``; a damaged or
    replaced file in the cache would otherwise be used as ImageNet weights.
    """
    match = torch.hub.HASH_REGEX.search(file.name)
    if match is None:
        return
    prefix = match.group(1)
    with open(file, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if not digest.startswith(prefix):
        raise WeightsError(f"ImageNet weights file {file} is damaged or not the original: its SHA-256 starts with "
                           f"{digest[:len(prefix)]}, but its name says {prefix}. Delete it, so that it is downloaded "
                           f"again, or copy the original from {url} into {file.parent}")


def _download_or_fail(enum, file: Path) -> None:
    # A short socket timeout turns a machine without network into a quick, clear error.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise WeightsError(
            f"ImageNet weights file {file.name} is not in {file.parent} and could not be "
            f"downloaded from {enum.url} ({error}). Copy the file into that folder, "
            "or pass --weights PATH for a local state dict, or --weights random for a smoke run."
        ) from error
    finally:
        socket.setdefaulttimeout(previous)


def _load_state_dict_file(model: nn.Module, path: Path, arch: str) -> str | None:
    """Load a state dict file into ``model``; return a note when the file's classifier was ignored."""
    if not path.is_file():
        raise WeightsError(
            f"weights {str(path)!r} is neither 'imagenet', 'random' nor an existing file; "
            "pass a state dict path, --weights imagenet or --weights random"
        )
    fix = "save the weights with torch.save(model.state_dict(), PATH) and pass that file"
    state_dict = strip_module_prefix(_unwrap_state_dict(_load_tensors(path, fix=fix), path))
    return _load_backbone_state(model, state_dict, path, arch)


def _load_tensors(path: Path, *, fix: str):
    """Load ``path`` with ``torch.load(weights_only=True)``, turning every failure into a WeightsError.

    torch's own message is left out because it suggests ``weights_only=False``, which would let
    a hostile file run code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            reason = "it contains pickled Python objects (for example a whole nn.Module), not only tensors"
        else:
            reason = "it is not a file written by torch.save, or it is damaged"
        raise WeightsError(f"cannot load weights from {path}: {reason}. emo-vision loads only tensors, because "
                           f"unpickling other objects can run code; {fix}") from error
    except Exception as error:  # torch raises RuntimeError, EOFError or KeyError for other files.
        raise WeightsError(f"cannot load weights from {path}: it is not a file written by torch.save, or it is "
                           f"damaged ({type(error).__name__}); {fix}") from error


def _load_backbone_state(model: nn.Module, state_dict: dict, path: Path, arch: str) -> str | None:
    """Load every backbone tensor of ``state_dict`` into ``model``, which must match it exactly.

    The classifier ``fc`` is the exception: extraction never uses it, so a file whose ``fc`` has
    another number of classes (a fine-tuned checkpoint), or none, still loads, and ``model``
    keeps its seeded ``fc``.

    Returns:
        None when the whole state dict was loaded, else a note on the ignored classifier.
    """
    expected = _tensor_shapes(model.state_dict())
    given = _tensor_shapes(state_dict)
    ignored = None
    if {name: given.get(name) for name in CLASSIFIER_KEYS} != {name: expected[name] for name in CLASSIFIER_KEYS}:
        shape = given.get("fc.weight")
        ignored = (f"its classifier fc{list(shape) if shape else ''} was ignored" if "fc.weight" in given
                   else "it has no classifier fc") + "; extraction does not use it"
        state_dict = {name: value for name, value in state_dict.items() if not name.startswith("fc.")}
        given = _tensor_shapes(state_dict)
        expected = {name: shape for name, shape in expected.items() if not name.startswith("fc.")}
    if given != expected:
        raise WeightsError(_misfit_message(path, arch, given, expected))
    model.load_state_dict(state_dict, strict=False)
    if ignored:
        logger.info("weights %s: %s", path, ignored)
    return ignored


# The classifier of a torchvision ResNet; extraction stops at layer4, before it.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def _tensor_shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    """Return name -> shape, without BatchNorm's ``num_batches_tracked``, which load_state_dict fills in."""
    return {name: tuple(value.shape) for name, value in state_dict.items()
            if not name.endswith("num_batches_tracked")}


def _misfit_message(path: Path, arch: str, given: dict, expected: dict) -> str:
    """Describe why a state dict does not fit ``arch``, naming the ResNet it fits when there is one."""
    probable = probable_resnet(given)
    if probable is not None:
        return f"weights in {path} are for {probable}, not {arch}; pass --arch {probable}"
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    resized = [name for name in given if name in expected and given[name] != expected[name]]
    details = []
    if missing:
        details.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]!r}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
    if resized:
        details.append(f"{len(resized)} tensor(s) of another shape, e.g. {resized[0]!r} "
                       f"{list(given[resized[0]])} instead of {list(expected[resized[0]])}")
    return (f"weights in {path} do not fit this architecture ({arch}) nor any other torchvision ResNet: "
            + ", ".join(details) + "; pass a state dict of a torchvision ResNet")


def probable_resnet(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Return the torchvision ResNet whose backbone tensors have exactly ``shapes``, or None.

    The classifier ``fc`` is left out of the comparison. Models are built on the meta device,
    which allocates no memory.

    Example:
        >>> model, _ = build_resnet("resnet34", "random")
        >>> probable_resnet(_tensor_shapes(model.state_dict()))
        'resnet34'
    """
    backbone = {name: shape for name, shape in shapes.items() if not name.startswith("fc.")}
    for arch in ARCHITECTURES:
        with torch.device("meta"):
            reference = _tensor_shapes(torchvision.models.get_model(arch, weights=None).state_dict())
        if backbone == {name: shape for name, shape in reference.items() if not name.startswith("fc.")}:
            return arch
    return None


def _unwrap_state_dict(obj, path: Path) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return obj


def strip_module_prefix(state_dict: dict) -> dict:
    """Remove the ``module.`` prefix that ``nn.DataParallel`` and DDP add to every key."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


class StageFeatures(nn.Module):
    """A ResNet split into its five stages; ``forward`` returns each stage's pooled output.

    Example:
        >>> model, _ = build_resnet("resnet18", "random")
        >>> pooled = StageFeatures(model)(torch.zeros(2, 3, 64, 64))
        >>> pooled["L4"].shape
        torch.Size([2, 512])
    """

    def __init__(self, resnet: nn.Module, stages: tuple[str, ...] = STAGE_NAMES):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        self.stages = stages
        # Layers after the deepest requested stage are never run.
        self.depth = max(STAGE_NAMES.index(name) for name in stages)

    def forward_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the feature maps [B, C, H, W] of the requested stages."""
        maps = {}
        x = self.stem(images)
        if "L0" in self.stages:
            maps["L0"] = x
        for index, layer in enumerate(self.layers[: self.depth], start=1):
            x = layer(x)
            if f"L{index}" in self.stages:
                maps[f"L{index}"] = x
        return maps

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the global-average-pooled outputs [B, C] of the requested stages."""
        return {name: fmap.mean(dim=(2, 3)) for name, fmap in self.forward_maps(images).items()}


def stage_channels(arch: str) -> dict[str, int]:
    """Return the channel count of each stage of ``arch``."""
    return {info.name: info.channels for info in stage_infos(arch)}


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from error
    # torch.device also accepts mps, xpu, meta and others, which emo does not run on.
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"invalid device {name!r}: emo runs on the CPU or CUDA only; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"invalid device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible, "
                         f"numbered from 0")
    return device
