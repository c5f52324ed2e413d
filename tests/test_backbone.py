import hashlib
import os
import urllib.error
from pathlib import Path
from types import SimpleNamespace

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
    with pytest.raises(WeightsError, match="are for resnet18, not resnet34; pass --arch resnet18"):
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
    (tmp_path / "checkpoints").mkdir()
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    # The real file cannot be made here, so the expected name carries this file's hash prefix instead.
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    url = f"https://download.pytorch.org/models/resnet18-{prefix}.pth"
    monkeypatch.setattr(backbone, "_imagenet_weights_enum", lambda arch: SimpleNamespace(url=url))
    staged.rename(tmp_path / "checkpoints" / os.path.basename(url))
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


@pytest.mark.parametrize("name", ["mps", "meta", "xpu"])
def test_resolve_device_rejects_other_backends(name):
    with pytest.raises(ValueError, match=f"invalid device '{name}': emo runs on the CPU or CUDA only"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_rejects_missing_gpu_index():
    index = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"only {index} CUDA device"):
        resolve_device(f"cuda:{index}")


def saved_state_dict(path: Path, arch: str = "resnet18", *, edit=None) -> Path:
    """Save the state dict of a seeded random ``arch``, changed by ``edit`` (dict -> dict), to ``path``."""
    model, _ = build_resnet(arch, "random", seed=1)
    state = model.state_dict()
    torch.save(edit(state) if edit else state, path)
    return path


def test_weights_of_another_depth_name_it(tmp_path):
    path = saved_state_dict(tmp_path / "r34.pt", "resnet34")
    with pytest.raises(WeightsError) as error:
        build_resnet("resnet18", str(path))
    message = str(error.value)
    assert "are for resnet34, not resnet18; pass --arch resnet34" in message
    assert len(message) < 300


def test_weights_with_other_classifier_load(tmp_path):
    def eight_classes(state):
        return {**state, "fc.weight": torch.zeros(8, 512), "fc.bias": torch.zeros(8)}

    path = saved_state_dict(tmp_path / "finetuned.pt", edit=eight_classes)
    model, record = build_resnet("resnet18", str(path), seed=2)
    source, _ = build_resnet("resnet18", "random", seed=1)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert "classifier fc[8, 512] was ignored" in record.source


def test_weights_without_classifier_load(tmp_path):
    def headless(state):
        return {name: value for name, value in state.items() if not name.startswith("fc.")}

    path = saved_state_dict(tmp_path / "headless.pt", edit=headless)
    model, record = build_resnet("resnet18", str(path), seed=2)
    source, _ = build_resnet("resnet18", "random", seed=1)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert "it has no classifier fc" in record.source


def test_weights_missing_backbone_tensor_rejected(tmp_path):
    def without_conv(state):
        return {name: value for name, value in state.items() if name != "layer1.0.conv1.weight"}

    path = saved_state_dict(tmp_path / "cut.pt", edit=without_conv)
    with pytest.raises(WeightsError, match="1 missing tensor\\(s\\), e.g. 'layer1.0.conv1.weight'"):
        build_resnet("resnet18", str(path))


def test_weights_record_absolute_path(tmp_path, monkeypatch):
    saved_state_dict(tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    _, record = build_resnet("resnet18", "w.pt")
    assert record.spec == str(tmp_path / "w.pt")


def pickled_model(path: Path) -> Path:
    torch.save(torchvision.models.resnet18(), path)
    return path


def text_file(path: Path) -> Path:
    path.write_text("these are not weights\n")
    return path


@pytest.mark.parametrize("write, reason", [
    (pickled_model, "it contains pickled Python objects"),
    (text_file, "it is not a file written by torch.save"),
])
def test_weights_file_not_a_state_dict_advice(tmp_path, write, reason):
    path = write(tmp_path / "weights.pt")
    with pytest.raises(WeightsError) as error:
        build_resnet("resnet18", str(path))
    message = str(error.value)
    assert reason in message
    assert "torch.save(model.state_dict(), PATH)" in message
    assert "weights_only=False" not in message


def corrupt_bytes(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 cut off")


def other_state_dict(path: Path) -> None:
    saved_state_dict(path)


@pytest.mark.parametrize("write", [corrupt_bytes, other_state_dict])
def test_imagenet_cache_file_hash_checked(tmp_path, monkeypatch, write):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    file = tmp_path / "checkpoints" / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    file.parent.mkdir()
    write(file)
    with pytest.raises(WeightsError) as error:
        build_resnet("resnet18", "imagenet")
    message = str(error.value)
    assert f"ImageNet weights file {file} is damaged or not the original" in message
    assert "its name says f37072fd" in message
