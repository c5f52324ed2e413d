"""Fine-tuning building blocks: variant models, training steps, optimizer, batches, config, runtime."""

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from emo.backbone import build_resnet
from emo.finetune.config import VARIANTS, FinetuneConfig
from emo.finetune.data import MergedTailBatchSampler, prepare_data, split_images, train_loader, worker_context
from emo.finetune.evaluate import predict_logits
from emo.finetune.loop import train_epoch
from emo.finetune.models import build_model
from emo.finetune.runtime import Runtime
from emo.finetune.steps import apply_step, build_optimizer, has_prefix, trainable_count, variant_steps

NUM_CLASSES = 3


def make_config(variant: str, **overrides) -> FinetuneConfig:
    values = dict(data=Path("unused"), variant=variant, out=Path("unused"), arch="resnet18", weights="random",
                  image_size=32, batch_size=16, workers=0, epochs=1, stack_epochs=1)
    values.update(overrides)
    return FinetuneConfig(**values)


def make_model(variant: str, arch: str = "resnet18"):
    resnet, _ = build_resnet(arch, "random", seed=0)
    return build_model(variant, resnet, NUM_CLASSES, arch=arch, dropout=0.5, seed=0)


def tiny_train_loader(config: FinetuneConfig):
    dataset, split = prepare_data(config, split_file=None)
    return train_loader(split_images(dataset, split, "train"), config,
                        sampler_generator=torch.Generator().manual_seed(0),
                        loader_generator=torch.Generator().manual_seed(1))


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# --- models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_outputs_logits_per_output(variant):
    model = make_model(variant).eval()
    outputs = model(torch.zeros(2, 3, 32, 32))
    assert next(iter(outputs)) == VARIANTS[variant]
    for name, logits in outputs.items():
        assert logits.shape == (2, NUM_CLASSES), name


def test_ensemble_outputs_branches_and_mixture():
    model = make_model("ensemble").eval()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert list(outputs) == ["ResNet-ensemble", "L0", "L1", "L2", "L3", "L4"]
    expected = torch.stack([torch.softmax(outputs[name], dim=1) for name in ("L0", "L1", "L2", "L3", "L4")]).mean(0)
    assert torch.allclose(torch.softmax(outputs["ResNet-ensemble"], dim=1), expected, atol=1e-6)


@pytest.mark.parametrize("image_size", [32, 37, 50, 64])
def test_skip_projections_match_l3_shape(image_size):
    model = make_model("skip").eval()
    images = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        l0 = model.stem(images)
        l1 = model.layer1(l0)
        l2 = model.layer2(l1)
        l3 = model.layer3(l2)
        for name, fmap in (("L0", l0), ("L1", l1), ("L2", l2)):
            assert model.projections[name](fmap).shape == l3.shape, name


def test_skip_weights_start_as_plain_mean():
    weights = make_model("skip").combination_weights()
    assert list(weights) == ["L0", "L1", "L2", "L3"]
    assert all(value == pytest.approx(0.25) for value in weights.values())


def test_l4_dropout_in_every_bottleneck_block():
    model = make_model("l4-dropout", arch="resnet50")
    for block in model.layer4:
        assert isinstance(block.conv3[0], nn.Dropout2d)
        assert block.conv3[0].p == 0.5
        assert block.conv3[1].kernel_size == (1, 1)
    assert not any(isinstance(module, nn.Dropout2d) for module in model.layer3.modules())


def test_l4_dropout_between_basic_block_convolutions():
    model = make_model("l4-dropout")
    for block in model.layer4:
        assert isinstance(block.conv2[0], nn.Dropout2d)
        assert block.conv2[1].kernel_size == (3, 3)


def test_l4_dropout_rejects_unknown_block():
    from emo.finetune.models import add_block_dropout

    with pytest.raises(TypeError, match="unexpected residual block type Identity"):
        add_block_dropout(nn.Sequential(nn.Identity()), 0.5)


def test_build_model_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant 'l3' is not one of"):
        make_model("l3")


def test_new_modules_seeded_independently_of_global_rng():
    torch.manual_seed(1)
    first = make_model("skip").state_dict()
    torch.manual_seed(2)
    second = make_model("skip").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


# --- steps: which parameters train -------------------------------------------------------------

def expected_trainable(variant: str) -> int:
    """Count the trainable parameters of a resnet18 variant from torchvision's modules alone."""
    resnet = torchvision.models.resnet18()
    fc = 512 * NUM_CLASSES + NUM_CLASSES
    layer4 = parameter_count(resnet.layer4)
    if variant == "fc":
        return fc
    if variant in ("l4", "l4-dropout"):
        return layer4 + fc
    if variant == "full":
        return parameter_count(resnet) - parameter_count(resnet.fc) + fc
    if variant == "skip":
        # 1x1 convolutions from 64, 64 and 128 channels to L3's 256, each with BatchNorm (2 x 256),
        # plus the four combination weights.
        projections = sum(channels * 256 + 2 * 256 for channels in (64, 64, 128))
        return projections + 4 + layer4 + fc
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", ["fc", "l4", "full", "l4-dropout", "skip"])
def test_trainable_count_matches_variant(variant):
    model = make_model(variant)
    (step,) = variant_steps(make_config(variant), model)
    assert trainable_count(model, step) == expected_trainable(variant)


def test_ensemble_trainable_counts_per_step():
    model = make_model("ensemble")
    step1, step2 = variant_steps(make_config("ensemble"), model)
    branches = sum(channels * NUM_CLASSES + NUM_CLASSES for channels in (64, 64, 128, 256, 512))
    backbone = parameter_count(torchvision.models.resnet18()) - 512 * 1000 - 1000
    assert trainable_count(model, step1) == backbone + branches
    assert trainable_count(model, step2) == branches + 5


def test_apply_step_sets_requires_grad_by_prefix():
    model = make_model("l4")
    apply_step(model, variant_steps(make_config("l4"), model)[0])
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name.startswith("layer4.") or name.startswith("fc.")), name


def test_has_prefix_matches_whole_names():
    assert has_prefix("layer4.0.conv1.weight", ("layer4",))
    assert has_prefix("mix_logits", ("mix_logits",))
    assert not has_prefix("layer40.weight", ("layer4",))


def test_frozen_batchnorm_stays_in_eval_mode():
    model = make_model("l4")
    apply_step(model, variant_steps(make_config("l4"), model)[0])
    model.train()
    assert model.training
    assert not model.bn1.training
    assert not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training


def test_optimizer_has_two_learning_rate_groups():
    model = make_model("skip")
    apply_step(model, variant_steps(make_config("skip"), model)[0])
    optimizer = build_optimizer(model, make_config("skip", lr_backbone=1e-4, lr_new=1e-3))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert {name: group["lr"] for name, group in groups.items()} == {"backbone": 1e-4, "new": 1e-3}
    assert sum(p.numel() for p in groups["backbone"]["params"]) == parameter_count(model.layer4)
    new_names = {id(p) for p in groups["new"]["params"]}
    assert new_names == {id(p) for name, p in model.named_parameters() if has_prefix(name, model.new_modules)}


def test_optimizer_is_nesterov_sgd_with_weight_decay():
    model = make_model("fc")
    apply_step(model, variant_steps(make_config("fc"), model)[0])
    optimizer = build_optimizer(model, make_config("fc"))
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups  # fc trains no pretrained parameter
    assert (group["name"], group["momentum"], group["nesterov"], group["weight_decay"]) == ("new", 0.9, True, 1e-4)


STEP_CASES = [(variant, 0) for variant in VARIANTS] + [("ensemble", 1)]


@pytest.mark.parametrize(("variant", "step_index"), STEP_CASES)
def test_epoch_changes_exactly_the_trained_parameters(ft_images, variant, step_index):
    config = make_config(variant, data=ft_images)
    model = make_model(variant)
    step = variant_steps(config, model)[step_index]
    loader = tiny_train_loader(config)
    before = {name: value.clone() for name, value in model.state_dict().items()}

    apply_step(model, step)
    train_epoch(model, loader, build_optimizer(model, config), step, Runtime.create("cpu"))

    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Parameters, and the BatchNorm statistics of trained modules; frozen BatchNorm statistics stay bit-identical.
    assert changed == {name for name in before if has_prefix(name, step.trainable)}


@pytest.mark.parametrize("variant", ["skip", "ensemble"])
def test_bf16_channels_last_epoch(ft_images, variant):
    # On CUDA, training runs under bf16 autocast with channels-last tensors; the CPU supports both,
    # so the dtype handling of the mixing layers runs here too.
    runtime = Runtime(torch.device("cpu"), bf16=True, channels_last=True)
    config = make_config(variant, data=ft_images)
    model = make_model(variant).to(memory_format=runtime.memory_format)
    step = variant_steps(config, model)[-1]
    loader = tiny_train_loader(config)
    apply_step(model, step)
    loss = train_epoch(model, loader, build_optimizer(model, config), step, runtime)
    logits, labels = predict_logits(model, loader, runtime)
    assert math.isfinite(loss)
    assert all(values.dtype == torch.float32 for values in logits.values())
    assert all(torch.isfinite(values).all() for values in logits.values())
    assert len(labels) == 48


def test_epoch_runs_with_trailing_batch_of_one(ft_images):
    # 48 training images in batches of 47 leave one image over; at 32 px layer4's maps are 1x1, where
    # BatchNorm in training mode rejects a batch of one.
    config = make_config("l4", data=ft_images, batch_size=47)
    model = make_model("l4")
    step = variant_steps(config, model)[0]
    loader = tiny_train_loader(config)
    apply_step(model, step)
    loss = train_epoch(model, loader, build_optimizer(model, config), step, Runtime.create("cpu"))
    assert len(loader) == 1
    assert loss > 0


# --- batches, config, runtime ------------------------------------------------------------------

@pytest.mark.parametrize(("size", "batch_size", "lengths"), [
    (9, 4, [4, 5]), (8, 4, [4, 4]), (10, 4, [4, 4, 2]), (1, 4, [1]), (5, 4, [5]), (0, 4, []),
])
def test_merged_tail_batches(size, batch_size, lengths):
    batches = list(MergedTailBatchSampler(range(size), batch_size))
    assert [len(batch) for batch in batches] == lengths
    assert len(MergedTailBatchSampler(range(size), batch_size)) == len(lengths)
    assert sorted(index for batch in batches for index in batch) == list(range(size))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"variant": "l3"}, "variant 'l3'"),
    ({"arch": "resnet19"}, "unsupported architecture 'resnet19'"),
    ({"sampling": "balanced"}, "sampling 'balanced'"),
    ({"precision": "fp16"}, "precision 'fp16'"),
    ({"epochs": 0}, "epochs and stack_epochs must be at least 1"),
    ({"stack_epochs": 0}, "epochs and stack_epochs must be at least 1"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"lr_new": 0.0}, "learning rates must be positive"),
    ({"lr_backbone": -1.0}, "learning rates must be positive"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"image_size": 16}, "image_size must be at least 32"),
    ({"workers": -1}, "workers must be 0 or more"),
    ({"resume": True, "overwrite": True}, "pass only one of them"),
])
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**{"variant": "fc", **overrides})


def test_fingerprint_ignores_resumable_options():
    base = make_config("fc")
    assert base.fingerprint() == make_config("fc", out=Path("elsewhere"), device="cpu", workers=3,
                                             resume=True).fingerprint()
    assert base.fingerprint() != make_config("fc", lr_new=0.01).fingerprint()


def test_runtime_on_cpu_is_float32_channels_last():
    runtime = Runtime.create("cpu", precision="bf16", channels_last=True)
    assert (runtime.bf16, runtime.channels_last) == (False, True)
    assert runtime.describe() == "cpu, float32, channels-last"
    assert runtime.memory_format == torch.channels_last


def test_runtime_without_channels_last_is_contiguous():
    runtime = Runtime.create("cpu", channels_last=False)
    assert runtime.describe() == "cpu, float32"
    assert runtime.memory_format == torch.contiguous_format


def test_loader_workers_start_from_forkserver():
    context = worker_context(2)
    if "forkserver" not in multiprocessing.get_all_start_methods():
        assert context is None
    else:
        assert context.get_start_method() == "forkserver"


def test_no_workers_need_no_start_method():
    assert worker_context(0) is None


# Starts a training loader with two forkserver workers over DATA, fetches one batch and waits.
LOADER_SCRIPT = """
import sys, time
from pathlib import Path
import torch
from emo.finetune.config import FinetuneConfig
from emo.finetune.data import SplitImages, train_loader
paths = sorted(Path(sys.argv[1]).rglob("*.jpg"))
config = FinetuneConfig(data=Path(sys.argv[1]), variant="fc", out=Path("unused"), image_size=32, batch_size=2,
                        workers=2)
loader = train_loader(SplitImages(paths, [index % 3 for index in range(len(paths))]), config,
                      sampler_generator=torch.Generator().manual_seed(0),
                      loader_generator=torch.Generator().manual_seed(0))
batches = iter(loader)
next(batches)
print("ready", flush=True)
time.sleep(300)
"""


def descendants(pid: int) -> set[int]:
    """Return the ids of every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process exited while the loop ran
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = set(), [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods() or not Path("/proc/self").is_dir(),
                    reason="needs the forkserver start method and /proc")
def test_loader_workers_exit_with_killed_trainer(ft_images):
    trainer = subprocess.Popen([sys.executable, "-c", LOADER_SCRIPT, str(ft_images)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        helpers = descendants(trainer.pid)  # the forkserver, its loader workers, the resource tracker
        assert len(helpers) >= 3
    finally:
        trainer.kill()
        trainer.wait()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(running(pid) for pid in helpers):
        time.sleep(0.2)
    left = [pid for pid in helpers if running(pid)]
    for pid in left:  # so that a failure leaves no stray processes behind
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived the killed training process"
