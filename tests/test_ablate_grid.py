"""Grid definitions of emo ablate: the default grid and TOML grid files."""

from pathlib import Path

import pytest

from emo.errors import GridError
from emo.heads.grid import DEFAULT_GRID, grid_configs, load_grid


def write_grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_grid_resolves_every_entry():
    entries = load_grid("default")
    configs = grid_configs(entries, cache=Path("c.h5"), seed=3, runs_dir=Path("runs"))

    assert len(configs) == len(DEFAULT_GRID) == 13
    assert len({config.name for config in configs}) == 13
    assert all(config.seed == 3 for config in configs)
    assert configs[0].out == Path("runs") / configs[0].name / "seed3"


def test_default_grid_covers_studied_factors():
    configs = grid_configs(load_grid("default"), cache=Path("c.h5"), seed=0, runs_dir=Path("runs"))
    names = {config.name for config in configs}

    for stage in ("L0", "L1", "L2", "L3", "L4"):
        assert f"{stage}_weighted_lr0.001_drop0_e50" in names
    for stages in ("L0-L4", "L1-L4", "L3-L4"):
        assert f"{stages}_stack-weighted_weighted_lr0.001_drop0_e50" in names
    assert "L0-L4_stack-mean_weighted_lr0.001_drop0_e50" in names
    assert "L0-L4_stack-logreg_weighted_lr0.001_drop0_e50" in names
    assert "L0-L4_concat_weighted_lr0.001_drop0_e50" in names
    assert "L0-L4_stack-weighted_shuffle_lr0.001_drop0_e50" in names
    assert "L0-L4_stack-weighted_weighted_lr0.001_drop0.5_e50" in names


def test_grid_file_applies_defaults(tmp_path):
    path = write_grid(tmp_path, """
[defaults]
epochs = 3
stack_epochs = 2

[[configs]]
stages = ["L4", "L3"]
stacking = "mean"

[[configs]]
stages = "L0,L2"
fusion = "concat"
batch-size = 8
epochs = 5
lr = 1
""")
    entries = load_grid(path)

    assert entries[0] == {"epochs": 3, "stack_epochs": 2, "stages": ("L3", "L4"), "stacking": "mean"}
    assert entries[1] == {"epochs": 5, "stack_epochs": 2, "stages": ("L0", "L2"), "fusion": "concat",
                          "batch_size": 8, "lr": 1}


@pytest.mark.parametrize("text, message", [
    ("[[configs]]\ndropuot = 0.5\n", "unknown key 'dropuot'; valid keys are stages"),
    ("[[configs]]\nseed = 1\n", "key 'seed' cannot be set in a grid"),
    ("[[configs]]\nout = 'x'\n", "key 'out' cannot be set in a grid"),
    ("[[configs]]\nepochs = '10'\n", "key 'epochs' must be int, got '10'"),
    ("[[configs]]\nepochs = true\n", "key 'epochs' must be int, got True"),
    ("[[configs]]\ndropout = 'high'\n", "key 'dropout' must be int or float"),
    ("[[configs]]\nstages = [1, 2]\n", "key 'stages' must list stage names"),
    ("[[configs]]\nstages = 'L5'\n", "key 'stages': unknown stage 'L5'"),
    ("[[configs]]\ndropout = 1.5\n", "configs[0]: --dropout must be in [0, 1), got 1.5"),
    ("[[configs]]\nstacking = 'max'\n", "stacking 'max' is not one of weighted, mean, logreg"),
    ("[[configs]]\nepochs = 2\n[[configs]]\nepochs = 0\n", "configs[1]: --epochs must be at least 1"),
    ("[defaults]\nsampling = 'balanced'\n[[configs]]\nepochs = 2\n", "[defaults]: --sampling 'balanced'"),
    ("defaults = 3\n[[configs]]\nepochs = 2\n", "'defaults' must be a table"),
    ("[defaults]\nepochs = 2\n", "list at least one configuration"),
    ("configs = []\n", "list at least one configuration"),
    ("configs = [1, 2]\n", "list at least one configuration"),
    ("[[config]]\nepochs = 2\n", "unknown top-level key 'config'"),
    ("[[configs]]\nepochs = [\n", "is not valid TOML"),
])
def test_grid_file_errors_name_the_problem(tmp_path, text, message):
    path = write_grid(tmp_path, text)

    with pytest.raises(GridError) as error:
        load_grid(path)

    assert message in str(error.value)


def test_grid_file_not_found(tmp_path):
    with pytest.raises(GridError, match="grid file .*missing.toml not found; pass --grid default"):
        load_grid(tmp_path / "missing.toml")


def test_grid_rejects_repeated_configuration(tmp_path):
    path = write_grid(tmp_path, "[[configs]]\nstages = 'L4'\n[[configs]]\nstages = 'L4'\nstacking = 'mean'\n")

    with pytest.raises(GridError, match=r"configs\[1\] repeats configs\[0\] \(L4_weighted"):
        grid_configs(load_grid(path), cache=Path("c.h5"), seed=0, runs_dir=Path("runs"))
