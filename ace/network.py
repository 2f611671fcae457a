"""What the algorithm needs to know about a text-to-image model, in one object.

The host (ComfyUI, through `nodes/comfy_models.network_of`, or a plain torch network in the tests)
builds a `Network` once; every stage reads what it needs from it and nothing else, so `ace/` never
touches the host's own model objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from .families import Projection
from .tokens import TextEncoder

# D(x_t, σ, context, pooled) -> the network's estimate of the clean latent x_0. `pooled` is the
# prompts' pooled text `[n, p]` (`TextEncoder.encode_pooled`) for a model that takes it (SDXL),
# from which the host builds the model's extra conditioning as its own sampling does; None for
# the others.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainingCompute:
    """How the host runs the network during stage 2, which sets its memory and speed.

    `precision`: "fp32" runs the network in the dtype its weights were loaded in (no autocast);
    "bf16" / "fp16" run it under autocast to that dtype (activations and saved tensors at half the
    size; the adapter's own parameters stay float32). `checkpointing`: gradient checkpointing of
    the network's blocks: their activations are recomputed in the backward pass instead of kept,
    trading about one more forward pass per backward for far less memory.
    """

    precision: str = "fp32"
    checkpointing: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be True or False, got {self.checkpointing!r}")


@dataclass
class Network:
    """A text-to-image model as ACE sees it.

    `weights` maps each projection's name to its weight W (any dtype and device; the host's own
    patches, such as LoRAs, already applied). `attach(edit)` is a context manager that yields the
    denoiser with `edit` (a `ProjectionEdit`) running on the projections, for stage 2; the original
    model's predictions come from the same network with the edit switched off. `sample_sigmas`
    (descending, ending at 0) draw the concept's examples; `train_sigmas` is a table of noise
    levels whose uniform draw is the model's training distribution, for stage 2, and
    `train_weights` the loss weight each of those levels had in the model's training, on the
    denoised estimate (None: not known; stage 2's default weighting, `noise_prediction_weights`,
    needs none, and `FinetuneConfig.loss_weighting="model"` refuses to run without it). `num_res_blocks`
    (residual blocks per UNet level) fixes the diffusers names of the projections in an exported
    LoRA. `compute` is how `attach` runs the network (precision, gradient checkpointing).
    """

    family: str
    projections: list[Projection]
    weights: dict[str, torch.Tensor]
    encoder: TextEncoder
    attach: Callable[..., ContextManager[Denoiser]]
    latent_shape: tuple[int, ...]
    sample_sigmas: torch.Tensor
    train_sigmas: torch.Tensor
    num_res_blocks: int
    device: torch.device = torch.device("cpu")
    compute: TrainingCompute = TrainingCompute()
    train_weights: torch.Tensor | None = None


def noise_prediction_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """1/σ²: a loss on the denoised estimate D, weighted so, is the noise-prediction loss on ε
    (D = x_t − σ ε)."""
    return 1 / sigmas.square()
