"""Writing and loading head runs in the common run-directory layout of :mod:`emo.runs`."""

from pathlib import Path

from emo import runs
from emo.errors import RunError
from emo.evaluate.files import write_metrics
from emo.heads.config import FitHeadsConfig
from emo.heads.model import StackedHeads


def write_head_run(config: FitHeadsConfig, *, model: StackedHeads, classes: list[str], backbone: dict,
                   metrics: dict, history: list[dict], cache: dict | None = None) -> Path:
    """Write every file of a head run; the run is marked incomplete until the last one is in place.

    ``cache`` is the :meth:`~emo.cache.reader.FeatureCache.run_record` of the training cache, which
    ``emo evaluate`` compares with the cache it is given.

    Raises:
        RunError: if a file cannot be written (disk full, permissions); the directory then keeps
            its incomplete marker, so readers reject it.
    """
    run_dir = runs.start_run(config.out, overwrite=config.overwrite)
    settings = {"kind": "heads", "name": config.name, "config": config.to_json(), "backbone": backbone,
                "channels": model.channels, "dropout": config.dropout, "fusion": config.fusion,
                "stacking": config.stacking}
    if cache is not None:
        settings["cache"] = cache
    try:
        runs.write_json_atomically(run_dir / "config.json", settings)
        runs.write_json_atomically(run_dir / "classes.json", classes)
        runs.save_state_dict_atomically(run_dir / "model.pt", model.state_dict())
        (run_dir / "history.jsonl").unlink(missing_ok=True)
        for record in history:
            runs.append_jsonl(run_dir / "history.jsonl", record)
        write_metrics(run_dir, metrics, split="test", title=config.name)
        runs.finish_run(run_dir)
    except OSError as error:
        raise RunError(f"writing run {run_dir} failed: {error}; it stays marked incomplete. "
                       "Fix the cause and rerun with --overwrite") from error
    return run_dir


def load_head_model(run_dir: Path, settings: dict) -> StackedHeads:
    """Rebuild the :class:`StackedHeads` of a head run from its config and ``model.pt``.

    Raises:
        RunError: if config.json has no valid ``channels`` or ``model.pt`` does not fit them.
    """
    channels = settings.get("channels")
    if not isinstance(channels, dict) or not channels or not all(isinstance(c, int) for c in channels.values()):
        raise RunError(f"{Path(run_dir) / 'config.json'} has no valid 'channels' (stage name -> width)")
    model = StackedHeads(channels, len(settings["classes"]), dropout=settings.get("dropout", 0.0),
                         fusion=settings.get("fusion", "branches"), stacking=settings.get("stacking", "weighted"))
    state_dict = runs.load_state_dict(Path(run_dir) / "model.pt")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise RunError(f"{Path(run_dir) / 'model.pt'} does not fit the heads described in config.json: {error}") from error
    return model.eval()
