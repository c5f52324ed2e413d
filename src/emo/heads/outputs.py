"""Writing and loading head runs in the common run-directory layout of :mod:`emo.runs`."""

from pathlib import Path

from emo import runs
from emo.evaluate.files import write_metrics
from emo.heads.config import FitHeadsConfig
from emo.heads.model import StackedHeads


def write_head_run(config: FitHeadsConfig, *, model: StackedHeads, classes: list[str], backbone: dict,
                   metrics: dict, history: list[dict]) -> Path:
    """Write every file of a head run; the run is marked incomplete until the last one is in place."""
    run_dir = runs.start_run(config.out, overwrite=config.overwrite)
    settings = {"kind": "heads", "name": config.name, "config": config.to_json(), "backbone": backbone,
                "channels": model.channels, "dropout": config.dropout, "fusion": config.fusion,
                "stacking": config.stacking}
    runs.write_json_atomically(run_dir / "config.json", settings)
    runs.write_json_atomically(run_dir / "classes.json", classes)
    runs.save_state_dict_atomically(run_dir / "model.pt", model.state_dict())
    (run_dir / "history.jsonl").unlink(missing_ok=True)
    for record in history:
        runs.append_jsonl(run_dir / "history.jsonl", record)
    write_metrics(run_dir, metrics, split="test", title=config.name)
    runs.finish_run(run_dir)
    return run_dir


def load_head_model(run_dir: Path, settings: dict) -> StackedHeads:
    """Rebuild the :class:`StackedHeads` of a head run from its config and ``model.pt``."""
    model = StackedHeads(settings["channels"], len(settings["classes"]), dropout=settings.get("dropout", 0.0),
                         fusion=settings.get("fusion", "branches"), stacking=settings.get("stacking", "weighted"))
    model.load_state_dict(runs.load_state_dict(Path(run_dir) / "model.pt"), strict=True)
    return model.eval()
