"""The toy models load as ComfyUI objects and draw what they are asked for.

Loads the committed weights (toy/weights/), samples with ComfyUI's own sampler and asks the
committed classifier what it sees. Runs on the CPU in well under a minute.
"""
from __future__ import annotations

import pytest
import torch

from comfy_harness import pack
from toy import world
from toy.classifier import classify, load_classifier


VARIANTS = {"causal": ("AceToyCausal", "ace-toy-causal"), "bidirectional": ("AceToy", "ace-toy")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def toy(comfy, request):
    return request.param, pack().toy.model.load_toy_model(request.param)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_toy_model_is_an_ace_toy_comfy_model(toy):
    import comfy.model_base
    import comfy.model_patcher

    name, (model, clip, vae) = toy
    config, family = VARIANTS[name]
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert type(model.model.model_config).__name__ == config
    assert pack().nodes.comfy_models.family_of(model) == family
    assert model.get_model_object("latent_format").latent_channels == 3


def test_cross_attention_takes_minilm_context(toy):
    _, (model, clip, _) = toy
    kv = {name: m for name, m in model.model.diffusion_model.named_modules()
          if name.endswith(("attn2.to_k", "attn2.to_v"))}
    assert len(kv) >= 4
    assert all(isinstance(m, torch.nn.Linear) and m.in_features == 384 for m in kv.values())
    context = clip.encode_from_tokens(clip.tokenize("a red circle"))
    assert context.shape == (1, 24, 384)


def test_pixel_vae_round_trip(toy):
    _, (_, _, vae) = toy
    latent = torch.rand(2, 3, 16, 16) * 2 - 1
    image = vae.decode(latent)
    assert image.shape == (2, 16, 16, 3)
    assert torch.allclose(vae.encode(image), latent, atol=1e-6)


def test_comfy_sampler_draws_the_prompted_shapes(toy, classifier):
    _, (model, clip, vae) = toy
    prompts = [world.Prompt(f"a {c} {o}", o, c, None)
               for o, c in zip(world.OBJECTS * 2, world.COLOURS * 4)]
    images = pack().toy.model.generate(model, clip, [p.text for p in prompts], seed=0)
    assert images.shape == (len(prompts), 3, 16, 16)
    pred = classify(classifier, images)
    objects = sum(p == q.object for p, q in zip(pred["object"], prompts)) / len(prompts)
    colours = sum(p == q.colour for p, q in zip(pred["colour"], prompts)) / len(prompts)
    # Chance is 1/8 for the object and 1/4 for the colour.
    assert objects >= 0.75, f"object accuracy {objects:.2f}: {list(zip(pred['object'], [q.text for q in prompts]))}"
    assert colours >= 0.9, f"colour accuracy {colours:.2f}"


def test_the_causal_encoder_reads_left_to_right_and_the_bidirectional_one_both_ways(comfy):
    toy = pack().toy.model
    for name, causal in (("causal", True), ("bidirectional", False)):
        clip = toy.load_toy_clip(name)
        e = toy.encode_prompts(clip, ["a red circle", "a red square"])
        prefix_equal = torch.allclose(e[0, :3], e[1, :3])  # [CLS] a red: the same words so far
        assert prefix_equal == causal, name
        assert not torch.allclose(e[0, 3], e[1, 3])
