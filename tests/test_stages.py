import pytest
import torch

from emo.backbone import StageFeatures, build_resnet
from emo.stages import STAGE_NAMES, parse_stages, stage_infos, validate_arch


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_stage_infos_match_real_shapes(arch):
    model, _ = build_resnet(arch, "random")
    maps = StageFeatures(model).forward_maps(torch.zeros(1, 3, 64, 64))
    for info in stage_infos(arch):
        assert maps[info.name].shape[1] == info.channels, info.name
        assert 64 // maps[info.name].shape[-1] == info.reduction, info.name


def test_stage_infos_resnet101_channels():
    assert [info.channels for info in stage_infos("resnet101")] == [64, 256, 512, 1024, 2048]


def test_stage_infos_names_in_order():
    assert tuple(info.name for info in stage_infos("resnet34")) == STAGE_NAMES


def test_validate_arch_rejects_unknown():
    with pytest.raises(ValueError, match="resnet200.*resnet18"):
        validate_arch("resnet200")


def test_parse_stages_canonical_order():
    assert parse_stages("l4, L0 ,L2") == ("L0", "L2", "L4")


@pytest.mark.parametrize("text, message", [("L5", "unknown stage 'L5'"), ("L1,L1", "repeats"), (" , ", "no stages")])
def test_parse_stages_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_stages(text)
