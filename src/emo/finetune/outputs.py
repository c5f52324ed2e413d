"""Files of a fine-tuned run (see :mod:`emo.runs` for the layout) and rebuilding its model.

Besides the common files, a fine-tuned run contains ``split.csv``, the split it was trained and
evaluated on, and ``checkpoint.pt``, the state after the last finished epoch (see
:mod:`emo.finetune.checkpoint`). ``config.json`` also records the dataset root, the model
name and, once training has finished, a ``training`` summary (trainable parameters per step,
mean minutes per epoch, best epochs).
"""

import json
import os
from pathlib import Path

import torch
import torchvision

from emo import runs
from emo.backbone import IMAGENET_MEAN, IMAGENET_STD, LoadedWeights, strip_module_prefix
from emo.data.transforms import resize_size
from emo.errors import RunError, WeightsError
from emo.finetune.config import FinetuneConfig
from emo.finetune.models import FinetuneNet, build_model
from emo.stages import validate_arch


def backbone_record(config: FinetuneConfig, weights: LoadedWeights) -> dict:
    """Return the backbone entry of config.json, with the same keys as a head run's."""
    return {
        "arch": config.arch,
        "weights": {"spec": weights.spec, "source": weights.source, "sha256": weights.sha256, "seed": config.seed},
        "image_size": config.image_size,
        "resize_size": resize_size(config.image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "precision": config.precision,
    }


def run_settings(config: FinetuneConfig, *, backbone: dict, dataset_root: Path, model: FinetuneNet) -> dict:
    """Return the content of a fine-tuned run's config.json."""
    return {"kind": "finetune", "name": config.name, "variant": config.variant, "model": model.primary,
            "config": config.to_json(), "backbone": backbone, "dataset_root": str(Path(dataset_root).resolve()),
            "dropout": config.dropout}


def write_history(run_dir: Path, history: list[dict]) -> None:
    """Rewrite history.jsonl with one line per finished epoch, through a rename."""
    path = Path(run_dir) / "history.jsonl"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in history), encoding="utf-8")
    os.replace(temporary, path)


def empty_model(settings: dict) -> FinetuneNet:
    """Build the model of a fine-tuned run with freshly initialised weights, ready to load a state dict."""
    config = settings["config"]
    arch = validate_arch(settings["backbone"]["arch"])
    resnet = torchvision.models.get_model(arch, weights=None)
    return build_model(settings["variant"], resnet, len(settings["classes"]), arch=arch,
                       dropout=config["dropout"], seed=config["seed"])


def load_finetune_model(settings: dict, *, weights: str | None = None) -> FinetuneNet:
    """Rebuild the trained model of a fine-tuned run, in eval mode on the CPU.

    Args:
        settings: the run's config.json with ``classes`` and ``run_dir`` added
            (as :func:`emo.predict.build_classifier` passes them).
        weights: a state dict file to load instead of the run's ``model.pt``. The run's
            ``checkpoint.pt`` loads too, and so do files saved from ``nn.DataParallel`` or DDP,
            whose keys start with ``module.``.

    Raises:
        WeightsError: if ``weights`` is not a file or does not fit the run's model.
    """
    if weights in ("imagenet", "random"):
        raise WeightsError(f"--weights {weights} does not apply to a fine-tuned run, whose model.pt contains every "
                           "weight; pass the path of a state dict of this run's model, or leave --weights out")
    path = Path(weights) if weights is not None else Path(settings["run_dir"]) / "model.pt"
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    state_dict = runs.load_state_dict(path)
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]  # a checkpoint.pt
    model = empty_model(settings)
    try:
        model.load_state_dict(strip_module_prefix(state_dict), strict=True)
    except RuntimeError as error:
        raise WeightsError(f"weights in {path} do not fit the {settings['model']} model of this run: {error}") from error
    return model.eval()


def require_finetune_settings(settings: dict, run_dir: Path) -> None:
    """Raise RunError if a fine-tuned run's config.json lacks an entry that loading needs."""
    for key in ("variant", "model", "config", "backbone", "dataset_root"):
        if key not in settings:
            raise RunError(f"{run_dir}/config.json of a fine-tuned run has no {key!r} entry; rerun `emo finetune`")


def probabilities(model: FinetuneNet, images: torch.Tensor) -> torch.Tensor:
    """Return the class probabilities [B, K] of the model's primary output."""
    return torch.softmax(model(images)[model.primary].float(), dim=1)
