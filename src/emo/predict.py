"""``emo predict``: run a trained run on new images and return the top emotions per image.

The class list, transform and backbone come from the run itself, so class folders added
elsewhere can never shift the indices.
"""

import logging
from pathlib import Path

import torch
from torch import nn

from emo import runs
from emo.backbone import StageFeatures, build_resnet, resolve_device
from emo.data.images import BadImageError, load_rgb
from emo.data.transforms import eval_transform, resize_size
from emo.errors import RunError, WeightsError
from emo.heads.outputs import load_head_model

logger = logging.getLogger(__name__)


class HeadsClassifier(nn.Module):
    """Frozen backbone stages followed by the stacked branch heads; returns probabilities [B, K]."""

    def __init__(self, stages: StageFeatures, heads: nn.Module):
        super().__init__()
        self.stages = stages
        self.heads = heads

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads.probabilities(self.stages(images))


def build_head_classifier(settings: dict, *, weights: str | None = None) -> nn.Module:
    """Rebuild backbone and heads of a head run; ``weights`` overrides the recorded weights spec.

    Raises:
        WeightsError: if the backbone weights differ from those the cache was extracted with.
    """
    backbone = settings["backbone"]
    recorded = backbone["weights"]
    if weights is None and recorded["spec"] not in ("imagenet", "random") and not Path(recorded["spec"]).is_file():
        raise WeightsError(f"the run's backbone weights {recorded['spec']} (recorded in "
                           f"{Path(settings['run_dir']) / 'config.json'}) not found; pass --weights with that file")
    model, loaded = build_resnet(backbone["arch"], weights or recorded["spec"], seed=recorded.get("seed", 0))
    if loaded.sha256 != recorded["sha256"]:
        raise WeightsError(f"weights {loaded.source} (sha256 {loaded.sha256[:12]}) differ from the weights the "
                           f"heads were trained on ({recorded['source']}, sha256 {recorded['sha256'][:12]}); "
                           "pass --weights with that file")
    heads = load_head_model(Path(settings["run_dir"]), settings)
    return HeadsClassifier(StageFeatures(model, tuple(settings["channels"])), heads).eval()


def build_classifier(run_dir: Path, *, weights: str | None = None) -> tuple[nn.Module, dict]:
    """Return a module mapping normalized images [B, 3, H, W] to class probabilities, and the run settings."""
    settings = runs.read_run_config(run_dir)
    settings["run_dir"] = str(run_dir)
    if settings.get("kind") == "heads":
        return build_head_classifier(settings, weights=weights), settings
    if settings.get("kind") == "finetune":
        from emo.finetune.predict import build_finetune_classifier

        return build_finetune_classifier(settings, weights=weights), settings
    raise RunError(f"run {run_dir} has unknown kind {settings.get('kind')!r}")


def predict(run_dir: Path, images: list[Path], *, weights: str | None = None, device: str = "auto",
            top_k: int = 3, batch_size: int = 16) -> list[dict]:
    """Classify image files with a finished run.

    Args:
        run_dir: a head run or a fine-tuned run.
        images: image files.
        weights: backbone weights to use instead of those recorded in the run.
        device: ``auto``, ``cpu`` or ``cuda``.
        top_k: how many classes to return per image, at least 1 (more than the run has means all).
        batch_size: images per forward pass.

    Returns:
        One dict per image: ``{"path", "top": [{"class", "probability"}, ...]}``, or
        ``{"path", "error"}`` for a file that cannot be read as an image.

    Example:
        >>> predict(Path("runs/heads"), [Path("photo.jpg")])[0]["top"][0]  # doctest: +SKIP
        {'class': 'joy', 'probability': 0.71}
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    torch_device = resolve_device(device)
    model, settings = build_classifier(Path(run_dir), weights=weights)
    model = model.to(torch_device)
    image_size = settings["backbone"]["image_size"]
    transform = eval_transform(image_size)
    classes = settings["classes"]
    top_k = max(1, min(top_k, len(classes)))

    results: dict[int, dict] = {}
    loaded = []
    for position, path in enumerate(images):
        try:
            loaded.append((position, transform(load_rgb(path, draft_size=resize_size(image_size)))))
        except (BadImageError, OSError) as error:
            results[position] = {"path": str(path), "error": getattr(error, "reason", str(error))}

    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start:start + batch_size]
        with torch.inference_mode():
            probabilities = model(torch.stack([tensor for _, tensor in chunk]).to(torch_device)).cpu()
        for (position, _), row in zip(chunk, probabilities):
            values, indices = row.topk(top_k)
            results[position] = {"path": str(images[position]),
                                 "top": [{"class": classes[i], "probability": float(v)} for v, i in zip(values, indices)]}
    return [results[position] for position in range(len(images))]
