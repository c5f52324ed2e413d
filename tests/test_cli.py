import json

import pytest
from click.testing import CliRunner

from emo.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def test_main_pipeline_through_cli(image_folder, tmp_path):
    cache, run = tmp_path / "c.h5", tmp_path / "run"
    result = invoke("extract", image_folder, "--out", cache, "--weights", "random", "--arch", "resnet18",
                    "--image-size", "32", "--workers", "0", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "60 images ->" in result.output

    result = invoke("fit-heads", cache, "--out", run, "--epochs", "3", "--stages", "L3,L4")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split()[:3] == ["model", "accuracy", "macro_recall"]

    result = invoke("evaluate", run, "--split", "val")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("val split, 3 images")

    result = invoke("predict", run, image_folder / "joy" / "000.jpg", "--json", "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)[0]["top"]) == 1


def test_user_error_exits_1_without_traceback(tmp_path):
    result = invoke("extract", tmp_path / "missing", "--out", tmp_path / "c.h5", "--weights", "random")
    assert result.exit_code == 1
    assert "Error: dataset" in result.output
    assert "Traceback" not in result.output


def test_bad_option_value_names_it(tmp_path):
    result = invoke("fit-heads", tmp_path / "c.h5", "--out", tmp_path / "r", "--stages", "L9")
    assert result.exit_code == 2
    assert "unknown stage 'L9'" in result.output


def test_output_suffix_is_checked(image_folder, tmp_path):
    result = invoke("extract", image_folder, "--out", tmp_path / "c.txt", "--weights", "random")
    assert result.exit_code == 1
    assert "should end in .h5" in result.output


def test_predict_bad_image_exits_1(head_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = invoke("predict", head_run, bad)
    assert result.exit_code == 1
    assert f"{bad}: error: zero bytes" in result.output


@pytest.mark.slow
def test_demo_runs_offline_and_replaces_itself(tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):
        result = invoke("demo", "--out", out, "--arch", "resnet18", "--image-size", "48")
        assert result.exit_code == 0, result.output
    assert "synthetic" in result.output
    assert f"outputs in {out}" in result.output
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["path"].split("/")[-2] for p in predictions] == ["fear", "joy", "sadness"]


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    result = invoke("demo", "--out", tmp_path)
    assert result.exit_code == 1
    assert "not an earlier demo folder" in result.output
    assert (tmp_path / "mine.txt").read_text() == "user data"
