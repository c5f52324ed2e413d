"""Image transforms: the evaluation transform of feature extraction and the training transform."""

from torchvision import transforms

from emo.backbone import IMAGENET_MEAN, IMAGENET_STD

# ImageNet practice: resize the shorter side to 256/224 of the crop, then centre-crop.
RESIZE_RATIO = 256 / 224


def resize_size(image_size: int) -> int:
    """Return the shorter-side size that precedes a centre crop of ``image_size``."""
    return int(round(image_size * RESIZE_RATIO))


def eval_crop(image_size: int) -> transforms.Compose:
    """Return the geometric part of :func:`eval_transform`: resize, then centre crop to ``image_size``."""
    return transforms.Compose([
        transforms.Resize(resize_size(image_size), antialias=True),
        transforms.CenterCrop(image_size),
    ])


def eval_transform(image_size: int) -> transforms.Compose:
    """Return resize, centre crop to ``image_size``, tensor conversion and ImageNet normalization."""
    return transforms.Compose([
        *eval_crop(image_size).transforms,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(image_size: int) -> transforms.Compose:
    """Return random resized crop to ``image_size``, horizontal flip and ImageNet normalization."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
