import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from emo import backbone
from emo.backbone import StageFeatures, build_resnet, resolve_device, state_dict_sha256, strip_module_prefix
from emo.errors import WeightsError


def test_stage_features_match_torchvision_feature_extractor():
    model, _ = build_resnet("resnet18", "random", seed=3)
    nodes = {"maxpool": "L0", "layer1": "L1", "layer2": "L2", "layer3": "L3", "layer4": "L4"}
    reference = create_feature_extractor(model, return_nodes=nodes)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = StageFeatures(model)(images)
        theirs = {name: fmap.mean(dim=(2, 3)) for name, fmap in reference(images).items()}
    for name in nodes.values():
        torch.testing.assert_close(ours[name], theirs[name])


def test_stage_features_subset_stops_early():
    model, _ = build_resnet("resnet18", "random")
    pooled = StageFeatures(model, ("L0", "L2"))(torch.zeros(1, 3, 32, 32))
    assert set(pooled) == {"L0", "L2"}


def test_random_weights_repeat_with_seed():
    _, first = build_resnet("resnet18", "random", seed=5)
    _, second = build_resnet("resnet18", "random", seed=5)
    _, other = build_resnet("resnet18", "random", seed=6)
    assert first.sha256 == second.sha256
    assert first.sha256 != other.sha256


def test_random_weights_leave_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    build_resnet("resnet18", "random", seed=9)
    assert torch.equal(torch.rand(1), expected)


def test_weights_path_loads_dataparallel_state_dict(tmp_path):
    model, record = build_resnet("resnet18", "random", seed=1)
    path = tmp_path / "dp.pt"
    torch.save(torch.nn.DataParallel(model).state_dict(), path)
    _, loaded = build_resnet("resnet18", str(path), seed=2)
    assert loaded.sha256 == record.sha256


def test_weights_path_wrong_architecture(tmp_path):
    model, _ = build_resnet("resnet18", "random")
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit this architecture"):
        build_resnet("resnet34", str(path))


def test_weights_path_missing_names_alternatives(tmp_path):
    with pytest.raises(WeightsError, match="--weights random"):
        build_resnet("resnet18", str(tmp_path / "missing.pt"))


def test_weights_path_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="does not contain a state dict"):
        build_resnet("resnet18", str(path))


def test_imagenet_loaded_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source, _ = build_resnet("resnet18", "random", seed=4)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / os.path.basename(url))
    _, loaded = build_resnet("resnet18", "imagenet")
    assert loaded.sha256 == state_dict_sha256(source)


def test_imagenet_missing_offline_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        build_resnet("resnet101", "imagenet")
    message = str(info.value)
    assert "resnet101-63fe2227.pth" in message
    assert str(Path(tmp_path) / "checkpoints") in message
    assert "--weights PATH" in message
    assert "--weights random" in message


def test_imagenet_download_timeout_is_short():
    assert backbone.DOWNLOAD_TIMEOUT_S <= 30


def test_strip_module_prefix_only_when_every_key_has_it():
    assert strip_module_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("tpu")
