"""The runtime settings of a fine-tuned model: device, bf16 autocast and channels-last memory format."""

import contextlib
import logging
from dataclasses import dataclass

import torch

from emo.backbone import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The device, and whether bf16 autocast (CUDA only) and channels-last are on."""

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def create(cls, device: str, *, precision: str = "bf16", channels_last: bool = True) -> "Runtime":
        """Resolve ``device``; keep bf16 only where it is CUDA.

        Channels-last applies on every device: oneDNN's CPU convolutions run on it without
        converting each layer's input and output. A plain resnet101 training loop at batch 32 on
        2 CPU cores trained 11 % more images/s in it than in the default layout (bench/finetune.py).

        Example:
            >>> Runtime.create("cpu")
            Runtime(device=device(type='cpu'), bf16=False, channels_last=True)
        """
        resolved = resolve_device(device)
        on_cuda = resolved.type == "cuda"
        if not on_cuda and precision == "bf16":
            logger.debug("bf16 autocast of training applies on CUDA only; training in float32 on %s", resolved)
        return cls(resolved, bf16=on_cuda and precision == "bf16", channels_last=channels_last)

    def describe(self) -> str:
        """Return e.g. ``cuda:0, bf16 autocast, channels-last`` or ``cpu, float32``."""
        parts = [str(self.device), "bf16 autocast" if self.bf16 else "float32"]
        return ", ".join(parts + (["channels-last"] if self.channels_last else []))

    @property
    def pin_memory(self) -> bool:
        """Whether data loaders should pin their batches, which speeds up copies to CUDA."""
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the model's weights and of each image batch."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context of a forward pass (a no-op unless bf16 is on)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """Move an image batch [B, 3, H, W] to the device in the memory format of the model."""
        return batch.to(self.device, non_blocking=True, memory_format=self.memory_format)
