"""Safe loading: pickles that carry code are rejected, and paths stored in caches and runs never direct a write."""

import ast
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner

from emo.cache.reader import FeatureCache
from emo.cli import main
from emo.extract import extract
from tests.hostile import jpeg_bytes, small_dataset, tiny_cache, tiny_extract_config, tiny_run  # noqa: F401 (fixtures)

SOURCE = Path(__file__).resolve().parents[1] / "src" / "emo"


class CodePayload:
    """An object whose unpickling calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_payload(path: Path, marker: Path, *, wrapped: bool = False) -> Path:
    """Save a pickle with a code payload, alone or inside a state-dict-like mapping."""
    payload = CodePayload(marker)
    torch.save({"state_dict": {"conv1.weight": payload}} if wrapped else payload, path)
    return path


def test_payload_really_runs_without_weights_only(tmp_path):
    """The payload works: unrestricted unpickling creates the marker, so its absence below means something."""
    marker = tmp_path / "marker"
    torch.load(write_payload(tmp_path / "payload.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_payload_as_extract_weights(tmp_path, wrapped):
    marker = tmp_path / "marker"
    weights = write_payload(tmp_path / "weights.pt", marker, wrapped=wrapped)
    data = small_dataset(tmp_path)
    result = CliRunner().invoke(main, ["extract", str(data), "--out", str(tmp_path / "cache.h5"), "--arch", "resnet18",
                                       "--weights", str(weights)])
    assert result.exit_code == 1
    assert f"cannot load weights from {weights}" in result.output
    assert not marker.exists()


def test_payload_as_predict_weights(tiny_run, tmp_path):
    marker = tmp_path / "marker"
    weights = write_payload(tmp_path / "weights.pt", marker)
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    result = CliRunner().invoke(main, ["predict", str(tiny_run), str(image), "--weights", str(weights)])
    assert result.exit_code == 1
    assert f"cannot load weights from {weights}" in result.output
    assert not marker.exists()


def run_with_payload_model(tiny_run: Path, folder: Path, marker: Path) -> Path:
    run = Path(shutil.copytree(tiny_run, folder / "run"))
    write_payload(run / "model.pt", marker)
    return run


def test_payload_as_run_model_in_evaluate(tiny_run, tmp_path):
    marker = tmp_path / "marker"
    run = run_with_payload_model(tiny_run, tmp_path, marker)
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert f"cannot load {run / 'model.pt'} safely as a state dict" in result.output
    assert not marker.exists()


def test_payload_as_run_model_in_predict(tiny_run, tmp_path):
    marker = tmp_path / "marker"
    run = run_with_payload_model(tiny_run, tmp_path, marker)
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    result = CliRunner().invoke(main, ["predict", str(run), str(image)])
    assert result.exit_code == 1
    assert f"cannot load {run / 'model.pt'} safely as a state dict" in result.output
    assert not marker.exists()


def test_payload_as_recorded_backbone_weights(tiny_run, tmp_path):
    """A run's config.json may name a weights file; predict loads it as safely as --weights."""
    marker = tmp_path / "marker"
    weights = write_payload(tmp_path / "weights.pt", marker)
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    settings = json.loads((run / "config.json").read_text())
    settings["backbone"]["weights"]["spec"] = str(weights)
    (run / "config.json").write_text(json.dumps(settings))
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    result = CliRunner().invoke(main, ["predict", str(run), str(image)])
    assert result.exit_code == 1
    assert f"cannot load weights from {weights}" in result.output
    assert not marker.exists()


def torch_load_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((f"{path.relative_to(SOURCE)}:{node.lineno}", node))
    return calls


def test_every_torch_load_is_weights_only():
    calls = torch_load_calls()
    assert calls, "no torch.load call found; the source folder moved?"
    for where, call in calls:
        keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}
        assert keywords.get("weights_only") == "True", where


@pytest.mark.parametrize("name", ["pickle.load", "pickle.loads", "eval", "exec", "yaml.load", "np.load",
                                  "numpy.load", "torch.jit.load", "dill.load"])
def test_no_unrestricted_loader_in_source(name):
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                assert ast.unparse(node.func) != name, f"{path.relative_to(SOURCE)}:{node.lineno} calls {name}"


def snapshot(folder: Path) -> dict[str, float]:
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*")
            if path.is_file()}


def test_stored_paths_never_direct_writes(tiny_cache, tiny_run, tmp_path):
    """Hostile paths in a cache and in a run's config.json: evaluate writes only inside the run directory."""
    cache = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    with h5py.File(cache, "r+") as file:
        hostile = ["../../../escaped.jpg", "/tmp/escaped.jpg", "joy/../../escaped.jpg"]
        paths = file["paths"].asstr()[:].astype(object)
        paths[: len(hostile)] = hostile
        file["paths"][:] = paths
        file.attrs["dataset_root"] = "/"
    run = Path(shutil.copytree(tiny_run, tmp_path / "work" / "run"))
    settings = json.loads((run / "config.json").read_text())
    settings["name"] = "../../escaped"
    settings["config"]["out"] = str(tmp_path / "elsewhere")
    settings["config"]["cache"] = str(cache)
    # The hostile paths change the split assignment that evaluate compares; record the new one.
    with FeatureCache(cache) as features:
        settings["cache"]["split_sha256"] = features.split_sha256()
    (run / "config.json").write_text(json.dumps(settings))

    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", str(run), "--split", "val"])
    assert result.exit_code == 0, result.output
    after = snapshot(tmp_path)
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed == {"work/run/metrics-val.json", "work/run/confusion_matrix-val.png"}
    assert not (tmp_path / "elsewhere").exists()
    assert not (tmp_path / "escaped.jpg").exists()


def test_extract_writes_only_next_to_the_cache(tmp_path):
    data = small_dataset(tmp_path)
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    before = snapshot(tmp_path)
    extract(tiny_extract_config(data, out_folder / "cache.h5"))
    after = snapshot(tmp_path)
    created = {name for name in after if name not in before}
    changed = {name for name in before if before[name] != after.get(name)}
    assert created == {"out/cache.h5", "out/cache.h5.lock", "out/cache.split.csv"}
    assert changed == set()


def test_predict_writes_nothing(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["predict", str(run), str(image), "--json"])
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before
    assert json.loads(result.stdout)[0]["path"] == str(image)
