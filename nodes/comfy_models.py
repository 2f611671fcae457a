"""ComfyUI's model objects as ACE sees them: which family a MODEL is, its projections and weights,
its text encoder, and the `Network` the algorithm runs on; and an erasure put back onto a MODEL.

Every node that takes a MODEL goes through these, so the mapping from ComfyUI's model classes to
ACE's families lives in one place.
"""
from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass
from typing import Iterator

import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.sd1_clip
import torch
import torch.utils.checkpoint

from ..ace.adapter import PatchedForward, ProjectionEdit
from ..ace.erasure import Erasure
from ..ace.families import Projection, check_family, cross_attention_projections
from ..ace.finetune import autograd_safe
from ..ace.network import PRECISIONS, Network, TrainingCompute, noise_prediction_weights
from ..ace.tokens import TextEncoder

# ComfyUI's model config class (comfy/supported_models.py) -> ACE family. Matched by exact class
# name: variants such as SD15_instructpix2pix take other inputs and are not assumed to work.
_FAMILY_OF_CONFIG: dict[str, str] = {
    "SD15": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "AceToyCausal": "ace-toy-causal",  # ACE's toy models (toy/model.py)
    "AceToy": "ace-toy",
}

# Image size of stage 2's examples when the caller gives none: each family's native resolution
# (the toy's 16x16 pixel grid is the latent of a 128 px EmptyLatentImage).
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024, "ace-toy-causal": 128, "ace-toy": 128}


def family_of(model_patcher) -> str:
    """ACE's family name for a ComfyUI MODEL ("sd1", "sd2", "sdxl"), else its config class name."""
    config_name = type(model_patcher.model.model_config).__name__
    if config_name.startswith("KOALA_"):
        return "sdxl"
    return _FAMILY_OF_CONFIG.get(config_name, config_name)


# ComfyUI's prediction types (comfy/model_sampling.py), most specific first: EDM is a kind of
# V_PREDICTION there, and V_PREDICTION and X0 kinds of EPS.
_PREDICTIONS = (("edm", comfy.model_sampling.EDM), ("v", comfy.model_sampling.V_PREDICTION),
                ("x0", comfy.model_sampling.X0), ("epsilon", comfy.model_sampling.EPS))


def prediction_type(model_patcher) -> str | None:
    """What the MODEL's UNet predicts as its sampling sees it ("epsilon", "v", ...; a
    ModelSamplingDiscrete node's choice included), or None for another kind of model sampling."""
    sampling = model_patcher.get_model_object("model_sampling")
    return next((name for name, kind in _PREDICTIONS if isinstance(sampling, kind)), None)


def unet_of(model_patcher) -> torch.nn.Module:
    """The denoising network (`diffusion_model`) inside a ComfyUI MODEL."""
    return model_patcher.model.diffusion_model


def check_model(model_patcher, model_name: str = "this model") -> list[Projection]:
    """Refuse a MODEL that ACE cannot edit; return its cross-attention key/value projections."""
    projections = cross_attention_projections(unet_of(model_patcher))
    check_family(family_of(model_patcher), projections, model_name)
    return projections


class ClipTextEncoder:
    """ACE's `TextEncoder` over a ComfyUI CLIP: the token embeddings its model's UNet receives, and
    (`encode_pooled`) the pooled text embedding next to them for models that also take that
    (SDXL), exactly as ComfyUI's CLIP Text Encode node computes both for a prompt.

    Whatever the CLIP (CLIP-L for SD1.x, OpenCLIP-H for SD2.x, CLIP-L and CLIP-G side by side for
    SDXL), a prompt is one window of its tokenizer: the start token, the words, the end token, then
    padding (the end token again for CLIP-L, token 0 for OpenCLIP-H and CLIP-G) up to 77 tokens.
    Every tower of a CLIP uses the same vocabulary, so position p holds the same word in each, and
    SDXL's two towers are joined along the width (CLIP-L's 768, then CLIP-G's 1280).
    """

    def __init__(self, clip, pooled: bool = False):
        self.clip = clip
        self.pooled = pooled
        # The first word-level tokenizer inside ComfyUI's wrapper (clip_l for SD1/SDXL, clip_h for
        # SD2): its start/end tokens tell where a prompt's words are.
        self.tokenizer = next(
            t for t in vars(clip.tokenizer).values() if hasattr(t, "tokenize_with_weights") and hasattr(t, "end_token")
        )
        self.start_tokens = 1 if self.tokenizer.start_token is not None else 0

    def count_tokens(self, text: str) -> int:
        chunk = self.tokenizer.tokenize_with_weights(text)[0]
        ids = [t[0] for t in chunk][self.start_tokens :]
        return ids.index(self.tokenizer.end_token) if self.tokenizer.end_token in ids else len(ids)

    def windows(self, prompt: str) -> dict[str, list]:
        """The prompt's first window of tokens for every tower of the CLIP ({"l": [...], "g": [...]})."""
        return {key: chunks[:1] for key, chunks in self.clip.tokenize(prompt).items()}

    def encode(self, prompts) -> torch.Tensor:
        cond = self.clip.encode_from_tokens(self._stacked_windows(prompts))
        return cond.reshape(len(prompts), -1, cond.shape[-1])

    def _stacked_windows(self, prompts) -> dict[str, list]:
        # One prompt = one window of tokens. ComfyUI encodes the windows of a long prompt as one
        # batch and joins them along the sequence, so N prompts go in as N windows and come back
        # as N rows: one call instead of N.
        windows: dict[str, list] = {}
        for prompt in prompts:
            for key, chunks in self.windows(prompt).items():
                windows.setdefault(key, []).extend(chunks)
        return windows

    def vocabulary(self) -> list[str]:
        """The tokenizer's whole words: alphabetic, three letters or more (BPE word-final tokens
        without their `</w>` mark; WordPiece tokens that do not continue a word)."""
        vocab = self.tokenizer.tokenizer.get_vocab()
        word_final = any(t.endswith("</w>") for t in vocab)
        words = {t.removesuffix("</w>") for t in vocab if (t.endswith("</w>") or not word_final)}
        return sorted(w for w in words if len(w) >= 3 and w.isalpha() and w.isascii())

    @property
    def scan_budget(self) -> int:
        """How many words concept expansion should encode: every word is a forward pass of its own,
        cheap when the prompt can be cut right after the word or on a GPU, 77 tokens long with
        ComfyUI's CLIP on a CPU (minutes for thousands of words)."""
        if comfy.model_management.get_torch_device().type == "cuda":
            return 4096
        self._last_token(["a"], self.start_tokens)  # learns whether this encoder takes cut prompts
        return 256 if _NEEDS_WHOLE_WINDOW.get(self.clip.cond_stage_model, False) else 4096

    def static_embeddings(self, words) -> torch.Tensor:
        """Each word's input token embedding (the mean over its tokens; the towers side by side), `[n, d]`:
        no forward pass, so the whole vocabulary costs nothing."""
        self.clip.load_model()
        vocab = self.tokenizer.tokenizer.get_vocab()
        suffix = "</w>" if any(t.endswith("</w>") for t in vocab) else ""
        towers = list(self.clip.tokenize("").keys())
        ids = []  # a vocabulary word is one token, the same id in every tower (SDXL's two CLIPs share it)
        for w in words:
            single = vocab.get(w + suffix)
            ids.append({t: [single] for t in towers} if single is not None else self._phrase_ids(w))
        parts = []
        for tower in towers:
            table = self._tower(tower).transformer.get_input_embeddings().weight.detach().float().cpu()
            parts.append(torch.stack([table[i[tower]].mean(0) if i[tower] else torch.zeros(table.shape[1]) for i in ids]))
        return torch.cat(parts, dim=1)

    def encode_words(self, words) -> torch.Tensor:
        """Each word's embedding at its last token where it stands as a prompt's only word, `[n, d]`.
        Cached per word for each CLIP and its patches."""
        cache = _WORD_CACHE.setdefault(self.clip.cond_stage_model, {}).setdefault(self.clip.patcher.patches_uuid, {})
        missing = [w for w in dict.fromkeys(words) if w not in cache]
        if missing:
            cache.update(zip(missing, self._encode_words(missing)))
        return torch.stack([cache[w] for w in words])

    def _encode_words(self, words: list[str], batch: int = 512) -> torch.Tensor:
        """The prompt is cut right after the word where the encoder allows it (BERT does; ComfyUI's
        CLIP adds all 77 position embeddings, so it gets the whole padded window, at 77 times the cost)."""
        out = torch.empty(len(words), clip_width(self.clip))
        by_count: dict[int, list[int]] = {}
        for i, word in enumerate(words):
            by_count.setdefault(self.count_tokens(word), []).append(i)
        with torch.no_grad():
            for n, indices in by_count.items():
                for start in range(0, len(indices), batch):
                    chunk = indices[start:start + batch]
                    out[chunk] = self._last_token([words[i] for i in chunk], self.start_tokens + n - 1)
        return out

    def _last_token(self, words: list[str], position: int) -> torch.Tensor:
        """The embeddings at `position` of one-word prompts, cut right after it when the encoder allows."""
        tokens = [self.clip.tokenize(w) for w in words]
        full = _NEEDS_WHOLE_WINDOW.get(self.clip.cond_stage_model, False)
        for cut in ((None,) if full else (position + 1, None)):
            towers = {k: [[(t, 1.0) for t, _ in tok[k][0][:cut]] for tok in tokens] for k in tokens[0]}
            try:
                cond = self.clip.encode_from_tokens(towers)
            except RuntimeError:  # this encoder needs its whole window
                _NEEDS_WHOLE_WINDOW[self.clip.cond_stage_model] = True
                continue
            return cond.reshape(len(words), -1, cond.shape[-1])[:, position].float().cpu()
        raise RuntimeError("the text encoder did not encode a one-word prompt")

    def _phrase_ids(self, phrase: str) -> dict[str, list[int]]:
        n = self.count_tokens(phrase)
        return {tower: [t for t, _ in chunks[0]][self.start_tokens:self.start_tokens + n]
                for tower, chunks in self.clip.tokenize(phrase).items()}

    def _tower(self, key: str) -> torch.nn.Module:
        model = self.clip.cond_stage_model
        return getattr(model, f"clip_{key}", None) or getattr(model, key)

    def soft_word(self, phrase: str) -> dict[str, torch.Tensor]:
        """The phrase's input token embeddings in each tower of the text encoder."""
        self.clip.load_model()
        return {tower: self._tower(tower).transformer.get_input_embeddings().weight[ids].detach().float().clone()
                for tower, ids in self._phrase_ids(phrase).items()}

    def encode_soft(self, prompts, phrase: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """`encode`, with `phrase` in each prompt replaced by `vectors` (ComfyUI's own path for
        textual-inversion embeddings), differentiable in them."""
        self.clip.load_model()
        autograd_safe(self.clip.cond_stage_model)  # weights made in inference mode cannot be backpropagated through
        wanted = self._phrase_ids(phrase)
        windows: dict[str, list] = {}
        for prompt in prompts:
            for tower, chunks in self.clip.tokenize(prompt).items():
                ids, n = [t for t, _ in chunks[0]], len(wanted[tower])
                at = next((i for i in range(len(ids) - n + 1) if ids[i:i + n] == wanted[tower]), None)
                if at is None:
                    raise ValueError(f"'{phrase}' is not in the prompt '{prompt}'")
                window = [(t, 1.0) for t in ids[:at]] + [(vectors[tower], 1.0)] + [(t, 1.0) for t in ids[at + n:]]
                windows.setdefault(tower, []).append(window)
        with differentiable_clip_layers():
            cond = self.clip.encode_from_tokens(windows)
        return cond.reshape(len(prompts), -1, cond.shape[-1])


    def encode_pooled(self, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context `[n, L, d]`, pooled `[n, p]`), or (context, None) for a model that takes no
        pooled text. ComfyUI hands back the pooled output of a batch's first window only (the one a
        long prompt's conditioning keeps), so every tower's own output is caught on its way out and
        the tower whose first row is the one ComfyUI returned (CLIP-G for SDXL) gives every row's."""
        if not self.pooled:
            return self.encode(prompts), None
        towers = [m for m in self.clip.cond_stage_model.modules() if isinstance(m, comfy.sd1_clip.SDClipModel)]
        caught: list[torch.Tensor] = []
        hooks = [t.register_forward_hook(lambda _m, _in, out: caught.append(out[1])) for t in towers]
        try:
            cond, first = self.clip.encode_from_tokens(self._stacked_windows(prompts), return_pooled=True)
        finally:
            for hook in hooks:
                hook.remove()
        for rows in caught:
            if rows is not None and len(rows) == len(prompts) and torch.equal(rows[:1].to(first), first):
                return cond.reshape(len(prompts), -1, cond.shape[-1]), rows.to(first)
        raise RuntimeError("no tower of this CLIP gave the pooled text ComfyUI returned")


@contextlib.contextmanager
def differentiable_clip_layers() -> Iterator[None]:
    """ComfyUI's CLIP layers add their residuals in place (`x += ...`), over the tensor their layer
    norm saved for the backward pass, so autograd cannot go back through them. For the block, they
    add out of place: the same numbers, and a graph stage 2's attack can differentiate."""
    import comfy.clip_model

    layer = comfy.clip_model.CLIPLayer
    original = layer.forward

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


_WORD_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # per text model, per patches, per word
_NEEDS_WHOLE_WINDOW: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def takes_pooled_text(model_patcher) -> bool:
    """Whether the MODEL's extra conditioning is built from the pooled text (SDXL and its distilled
    variants: SSD-1B, Vega, KOALA), as ComfyUI's SDXL model class computes it in `encode_adm`."""
    return isinstance(model_patcher.model, comfy.model_base.SDXL)


def clip_width(clip) -> int:
    """The width of the token embeddings a CLIP really feeds a UNet: encode an empty prompt and look."""
    return clip.encode_from_tokens(clip.tokenize("")).shape[-1]


def text_encoder(model_patcher, clip) -> ClipTextEncoder:
    """ACE's text encoder over `clip`, refused unless its embeddings fit the MODEL's cross-attention."""
    width, context = clip_width(clip), check_model(model_patcher)[0].in_features
    if width != context:
        raise ValueError(
            f"This CLIP gives {width}-wide text embeddings but the model takes {context}: connect the "
            "CLIP loaded with this model (same checkpoint)."
        )
    return ClipTextEncoder(clip, pooled=takes_pooled_text(model_patcher))


def projection_weights(model_patcher, projections: list[Projection]) -> dict[str, torch.Tensor]:
    """The weights of the projections ACE edits, with the MODEL's weight patches (LoRAs) applied.

    Clones of a MODEL share its weights, and ComfyUI patches them in place for whichever clone it
    loaded last (a LoRA in another branch of the graph, this MODEL itself): the original weight
    then sits in the clones' shared `backup`, and that is the one to start from."""
    modules = dict(unet_of(model_patcher).named_modules())
    weights = {}
    for p in projections:
        key = f"diffusion_model.{p.name}.weight"
        backup = model_patcher.backup.get(key)
        weight = backup.weight if backup is not None else modules[p.name].weight
        if key in model_patcher.patches:
            weight = comfy.lora.calculate_weight(model_patcher.patches[key], weight.float().clone(), key)
        weights[p.name] = weight
    return weights


def num_res_blocks(model_patcher) -> int:
    """Residual blocks per UNet level, which fixes the diffusers names of its layers."""
    n = model_patcher.model.model_config.unet_config["num_res_blocks"]
    return n[0] if isinstance(n, (list, tuple)) else int(n)


def latent_shape(model_patcher, resolution: int) -> tuple[int, int, int]:
    """The latent of a square `resolution`-pixel image (ComfyUI's EmptyLatentImage divides by 8)."""
    channels = model_patcher.model.latent_format.latent_channels
    side = max(resolution // 8, 1)
    return (channels, side, side)


# EDM's default training noise distribution, ln σ ~ N(-1.2, 1.2²) (Karras et al. 2022): the one a
# model whose sampling is continuous EDM states nothing more specific about.
EDM_LOG_SIGMA_MEAN, EDM_LOG_SIGMA_STD = -1.2, 1.2


def training_sigmas(model_patcher, sample_steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels from the model's own schedule: a short schedule to sample the concept's
    examples with (descending, ending at 0), and a table of levels whose uniform draw is how the
    model was trained, for stage 2 to train at.

    A discrete-time model (SD1.x, SD2.x, SDXL) was trained at timesteps drawn uniformly: its
    table of 1000 levels. A continuous EDM model's table is spaced evenly in log σ from its
    smallest to its largest level; drawing from it would spend half the steps where the picture
    is already decided or not begun (measured on the toy: the erase and attack losses were
    ~0), so it gets 1000 quantiles of EDM's training distribution, within its range."""
    sampling = model_patcher.get_model_object("model_sampling")
    sample = comfy.samplers.calculate_sigmas(sampling, "karras", sample_steps).float().cpu()
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM):
        quantiles = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
        log_sigma = EDM_LOG_SIGMA_MEAN + EDM_LOG_SIGMA_STD * math.sqrt(2) * torch.special.erfinv(2 * quantiles - 1)
        table = log_sigma.exp().clamp(float(sampling.sigma_min), float(sampling.sigma_max)).float()
    else:
        table = sampling.sigmas.float().cpu()
    return sample, table


def training_weights(model_patcher, sigmas: torch.Tensor) -> torch.Tensor:
    """The loss weight the model was trained with at each of `sigmas`, written on the denoised
    estimate: 1/σ² for a noise-predicting model (its ε loss), (σ² + σ_d²) / (σ σ_d)² for
    v-prediction and EDM (their loss on the network's output)."""
    sampling = model_patcher.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        sigma_data = float(sampling.sigma_data)
        return (sigmas.square() + sigma_data ** 2) / (sigmas * sigma_data).square()
    return noise_prediction_weights(sigmas)


def default_compute(model_patcher) -> TrainingCompute:
    """Stage 2's safe defaults where the MODEL runs. On the CPU (and any device but CUDA): fp32 and
    no checkpointing, the plain path that every device runs. On a CUDA GPU: bf16
    autocast where the GPU has it (Ampere and later), else fp16, and gradient checkpointing for
    SDXL, the largest UNet at the largest resolution (what each setting needs is measured by
    `benchmark/memory.py`)."""
    if model_patcher.load_device.type != "cuda":
        return TrainingCompute()
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return TrainingCompute(precision, checkpointing=family_of(model_patcher) == "sdxl")


PRECISION_CHOICES = ("auto", *PRECISIONS)
CHECKPOINTING_CHOICES = ("auto", "on", "off")


def training_compute(model_patcher, precision: str = "auto", checkpointing: str = "auto") -> TrainingCompute:
    """A user's choice of stage 2's precision and gradient checkpointing ("auto": `default_compute`),
    refused when the MODEL's device cannot run it."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if checkpointing not in CHECKPOINTING_CHOICES:
        raise ValueError(f"gradient checkpointing must be one of {', '.join(CHECKPOINTING_CHOICES)}, got {checkpointing!r}")
    default = default_compute(model_patcher)
    device = model_patcher.load_device
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU cannot compute in bf16: choose fp16 or fp32 for the fine-tuning.")
    if precision in ("bf16", "fp16") and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ValueError(f"torch has no {precision} autocast on {device.type}: choose fp32 for the fine-tuning.")
    return TrainingCompute(
        default.precision if precision == "auto" else precision,
        default.checkpointing if checkpointing == "auto" else checkpointing == "on",
    )


def network_of(model_patcher, clip, resolution: int | None = None, compute: TrainingCompute | None = None) -> Network:
    """The MODEL and its CLIP as the algorithm's `Network` (the MODEL itself is never changed)."""
    return model_network(model_patcher, text_encoder(model_patcher, clip), resolution, compute)


def model_network(model_patcher, encoder: TextEncoder, resolution: int | None = None,
                  compute: TrainingCompute | None = None) -> Network:
    """The MODEL as the algorithm's `Network`, with any `TextEncoder` of its context width.
    `compute` (default: `default_compute`) is how stage 2 runs the network."""
    projections = check_model(model_patcher)
    family = family_of(model_patcher)
    sample_sigmas, train_sigmas = training_sigmas(model_patcher)
    compute = compute or default_compute(model_patcher)
    return Network(
        family=family,
        projections=projections,
        weights=projection_weights(model_patcher, projections),
        encoder=encoder,
        attach=lambda edit: attached_for_training(model_patcher, edit, compute),
        latent_shape=latent_shape(model_patcher, resolution or DEFAULT_RESOLUTION.get(family, 512)),
        sample_sigmas=sample_sigmas,
        train_sigmas=train_sigmas,
        train_weights=training_weights(model_patcher, train_sigmas),
        num_res_blocks=num_res_blocks(model_patcher),
        device=model_patcher.load_device,
        compute=compute,
    )


class UnbakedErasureError(ValueError):
    """An erased MODEL went to a saver: its erasure lives in its forward, not in its weights."""


class RefuseUnbakedSave:
    """Stands in for the model's `state_dict_for_saving` while an erased MODEL is loaded, so that
    Save Checkpoint, Save Model and every saver that goes through ComfyUI's `save_checkpoint` stop
    with a clear error instead of writing the original, un-erased weights. (The gated edit replaces
    each projection's forward; savers only see weights.)"""

    def __call__(self, *args, **kwargs):
        raise UnbakedErasureError(
            "This MODEL carries an ACE erasure, which acts in the model's forward pass, not in its weights: "
            "saving it would write the original model with the concepts intact. Put ACE Bake Erasure between "
            "the erased MODEL and the saver to write the erasure into the weights (gate open), or keep the "
            "gated erasure as a file with ACE Save Erasure.")


SAVE_GUARD = "state_dict_for_saving"  # the object patch that holds a RefuseUnbakedSave


def with_erasure(model_patcher, erasure: Erasure, strength: float):
    """A clone of the MODEL whose cross-attention projections run the gated edit.

    The edit is a set of object patches (each projection's `forward`), which ComfyUI applies when
    it loads this clone and removes when it unloads it: the input MODEL, and every other branch of
    the graph, stay as they were. Weight patches such as LoRAs keep working underneath. Savers
    refuse the clone until it is `baked` (see `RefuseUnbakedSave`).
    """
    erasure.check_fits(family_of(model_patcher), check_model(model_patcher))
    adapter = copy.deepcopy(erasure.adapter)
    adapter.strength = strength
    adapter.requires_grad_(False)
    _GATE_NAMES[adapter] = tuple(erasure.gate_names())
    clone = patched_clone(model_patcher, adapter)
    clone.add_object_patch(SAVE_GUARD, RefuseUnbakedSave())
    return clone


# The concepts of each adapter `with_erasure` put on a MODEL (the MODEL carries the adapter
# alone), for `erasures_on`; an entry goes when its adapter does.
_GATE_NAMES: "weakref.WeakKeyDictionary[ProjectionEdit, tuple[str, ...]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class AppliedErasure:
    """A gated erasure as a MODEL runs it: its adapter (with the strength it was applied at) and
    the concept of each of its gates."""

    adapter: ProjectionEdit
    gate_names: tuple[str, ...]


def erasures_on(model_patcher) -> list[AppliedErasure]:
    """The gated erasures on a MODEL, in the order they were applied (ACE Erase Concept, ACE
    Apply Erasure, chained): the ACE forwards of its object patches, walked as `baked` does."""
    found: dict[int, ProjectionEdit] = {}
    for forward in model_patcher.object_patches.values():
        chain = []
        while isinstance(forward, PatchedForward):
            chain.append(forward.edit)
            forward = forward.inner
        for edit in reversed(chain):  # innermost first: the first applied
            if hasattr(edit, "gate"):  # gated edits only (a plain weight delta has no gate to show)
                found.setdefault(id(edit), edit)
    return [AppliedErasure(edit, _GATE_NAMES.get(edit) or tuple(f"concept {k + 1}" for k in range(edit.num_gates)))
            for edit in found.values()]


def baked(model_patcher):
    """A clone of an erased MODEL with every ACE edit on it written into its weights, gate open:
    each projection's chain of ACE forwards is taken off and its edits added as weight patches
    (ΔW = strength · Σ_k B_k A_k), which ComfyUI's savers write. Other patches stay as they were."""
    clone = model_patcher.clone()
    found = False
    for key, forward in list(clone.object_patches.items()):
        edits, underneath = [], forward
        while isinstance(underneath, PatchedForward):
            edits.append((underneath.edit, underneath.index))
            underneath = underneath.inner
        if not edits:
            continue
        found = True
        if underneath is None:
            del clone.object_patches[key]
        else:
            clone.object_patches[key] = underneath
        delta = sum(edit.weight_delta(index) for edit, index in edits if edit.active)
        if torch.is_tensor(delta):
            clone.add_patches({key.removesuffix(".forward") + ".weight": (delta,)}, 1.0)
    if not found:
        raise ValueError("This MODEL carries no ACE erasure to bake: connect the MODEL output of ACE Erase Concept "
                         "or ACE Apply Erasure.")
    clone.object_patches.pop(SAVE_GUARD, None)
    return clone


def patched_clone(model_patcher, edit: ProjectionEdit):
    """A clone whose projections run `edit` on top of whatever forwards they already had."""
    clone = model_patcher.clone()
    modules = dict(unet_of(model_patcher).named_modules())
    patches = edit.patched_forwards(modules, "diffusion_model.", existing=clone.object_patches)
    for name, forward in patches.items():
        clone.add_object_patch(name, forward)
    return clone


@contextlib.contextmanager
def loaded_for_gradients(model_patcher) -> Iterator:
    """The MODEL loaded by ComfyUI's model management with its patches, its network usable by
    autograd and frozen; yields ComfyUI's `BaseModel`. On exit the MODEL is unloaded the way
    ComfyUI unloads a model when another one loads, so its patches come off now, also when the
    block was interrupted, and nothing half-patched stays behind."""
    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    base = model_patcher.model
    autograd_safe(base.diffusion_model)
    base.diffusion_model.requires_grad_(False)
    try:
        yield base
    finally:
        loaded = comfy.model_management.current_loaded_models
        for i in reversed(range(len(loaded))):
            if loaded[i].model is model_patcher:
                entry = loaded.pop(i)
                entry.model.detach(unpatch_all=True)
                entry.model_finalizer.detach()


# The UNet blocks whose activations gradient checkpointing recomputes: every residual block and
# every transformer (the layers that hold nearly all of the activations), as diffusers and
# ComfyUI's own trainer choose them.
CHECKPOINTED_BLOCKS = (comfy.ldm.modules.diffusionmodules.openaimodel.ResBlock,
                       comfy.ldm.modules.attention.SpatialTransformer)


class CheckpointedForward:
    """Replacement `forward` of one UNet block while stage 2 trains: with gradients on, the block
    runs under `torch.utils.checkpoint`, which keeps only its inputs and recomputes the rest in the
    backward pass. An object patch like ACE's own projection forwards, so it lives on a clone only
    and comes off when ComfyUI unloads that clone."""

    def __init__(self, module: torch.nn.Module, inner=None):
        self.module, self.inner = module, inner

    def __call__(self, *args, **kwargs):
        forward = self.inner or (lambda *a, **k: type(self.module).forward(self.module, *a, **k))
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # ComfyUI's UNet keeps the state of its forward pass in `transformer_options`, a dict it
        # changes block after block; the recomputation must see this call's state, not the last.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpointed_clone(model_patcher):
    """A clone whose UNet blocks (`CHECKPOINTED_BLOCKS`) run with gradient checkpointing."""
    clone = model_patcher.clone()
    for name, module in unet_of(model_patcher).named_modules():
        if isinstance(module, CHECKPOINTED_BLOCKS):
            key = f"diffusion_model.{name}.forward"
            clone.add_object_patch(key, CheckpointedForward(module, clone.object_patches.get(key)))
    return clone


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def adm_conditioning(base, x_t: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor | None:
    """The UNet's extra conditioning `y` for a batch, or None for a model that takes none.

    It goes through the path ComfyUI's samplers take (`encode_model_conds` -> the model's
    `extra_conds` -> `encode_adm`), with what CLIP Text Encode puts into a conditioning: for SDXL
    the pooled text plus the size embeddings (width and height from the latent, crop 0, target =
    size); for SD2 unCLIP the zeros of no image. Without pooled text an SDXL gets zeros, which
    its sampling never feeds it."""
    if not getattr(base, "adm_channels", 0):
        return None
    if pooled is None and isinstance(base, comfy.model_base.SDXL):
        return torch.zeros(len(x_t), base.adm_channels, device=x_t.device, dtype=x_t.dtype)
    cond = {"model_conds": {}} if pooled is None else {"model_conds": {}, "pooled_output": pooled}
    [encoded] = comfy.samplers.encode_model_conds(base.extra_conds, [cond], x_t, x_t.device, "positive")
    y = encoded["model_conds"]["y"].cond.to(x_t.device)
    return y.expand(len(x_t), -1) if len(y) == 1 else y


@contextlib.contextmanager
def attached_for_training(model_patcher, edit: ProjectionEdit, compute: TrainingCompute = TrainingCompute()) -> Iterator:
    """Stage 2's network: a clone running `edit`, loaded once, as a denoiser
    D(x_t, σ, context, pooled=None) -> x_0. It is ComfyUI's `apply_model`, so the model's own
    sampling (epsilon or v-prediction, its sigmas, a ModelSamplingDiscrete patch) turns the UNet's
    output into x_0. `pooled` (`[n, p]`, from `ClipTextEncoder.encode_pooled`) makes SDXL's extra
    conditioning as sampling does (`adm_conditioning`). `compute` sets autocast and gradient
    checkpointing, both on the clone only. The "original" predictions come from the same network
    with the edit switched off, so no second copy of the UNet is ever made."""
    clone = patched_clone(model_patcher, edit)
    if compute.checkpointing:
        clone = checkpointed_clone(clone)
    with loaded_for_gradients(clone) as base:
        dtype = base.get_dtype()

        def denoise(x_t, sigma, context, pooled=None):
            y = adm_conditioning(base, x_t, pooled)
            extra = {} if y is None else {"y": y}
            with autocast(x_t.device, compute.precision):
                return base.apply_model(x_t, sigma, c_crossattn=context.to(dtype), **extra).float()

        yield denoise
