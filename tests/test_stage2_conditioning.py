"""Stage 2's network sees what sampling feeds the UNet: SDXL's pooled-text and size conditioning,
and SD2's v-prediction through ComfyUI's model sampling (in-memory models, real text encoders)."""
from __future__ import annotations

import pytest
import torch

from comfy_harness import pack, tiny_sd2_model

PROMPT = "a photo of vincent van gogh"


def sample_once(model, clip, prompt: str, latent_size=(8, 12)):
    """One Euler step of ComfyUI's own sampler on `prompt` (CLIP Text Encode's conditioning, CFG 1,
    so only the prompt's pass runs); returns what its UNet call got and gave: (input, sigma,
    conditioning dict with c_crossattn and y, denoised output)."""
    import comfy.sample

    calls = []

    def record(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((args["input"].clone(), args["timestep"].clone(), dict(args["c"]), out.clone()))
        return out

    watched = model.clone()
    watched.set_model_unet_function_wrapper(record)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, *latent_size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(watched, noise, 1, 1.0, "euler", "normal", positive, negative, latent,
                        disable_pbar=True, seed=0)
    [call] = calls
    return call


def test_sdxl_stage2_feeds_the_unet_the_pooled_text_and_size_conditioning_of_sampling(sdxl_model, sdxl_clip):
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    x, sigma, conditioning, sampled = sample_once(sdxl_model, sdxl_clip, PROMPT)
    assert conditioning["y"].shape == (1, 2816)

    network = comfy_models.network_of(sdxl_model, sdxl_clip, resolution=64)
    context, pooled = network.encoder.encode_pooled([PROMPT, "a dog running on the beach"])
    request = ace.concepts.parse_request("vincent van gogh", "a painting")
    closed = ace.erasure.erase(network, request, training=ace.finetune.FinetuneConfig(steps=0))
    received = []
    label_emb = sdxl_model.model.diffusion_model.label_emb  # the UNet's input layer for y
    hook = label_emb.register_forward_hook(lambda module, inputs, output: received.append(inputs[0].detach().clone()))
    try:
        with network.attach(closed.adapter) as denoise, closed.adapter.disabled():
            ours = denoise(x, sigma, context[:1].to(x.device), pooled[:1].to(x.device))
            other_pooled = denoise(x, sigma, context[:1].to(x.device), pooled[1:].to(x.device))
            no_pooled = denoise(x, sigma, context[:1].to(x.device))
            bigger = torch.cat([x, x], -1)  # a wider latent: another width in y
            denoise(bigger, sigma, context[:1].to(x.device), pooled[:1].to(x.device))
    finally:
        hook.remove()
    # the same y reaches the UNet as in sampling (pooled text, then size embeddings of 96x64 px)
    assert torch.allclose(received[0], conditioning["y"].to(received[0]), atol=1e-6)
    assert torch.allclose(ours, sampled.float(), rtol=1e-4, atol=1e-5)
    y_pooled, y_sizes = received[0][:, :1280], received[0][:, 1280:]
    assert torch.allclose(y_pooled.cpu(), pooled[:1], atol=1e-6)
    # the conditioning matters: another prompt's pooled text, or none, gives another prediction
    assert not torch.allclose(received[1][:, :1280], received[0][:, :1280])
    assert (other_pooled - ours).abs().mean() > 1e-4
    assert torch.equal(received[2], torch.zeros_like(received[2])) and (no_pooled - ours).abs().mean() > 1e-4
    # the size part follows the latent: only the width embeddings (2nd and 6th of six) change
    wider = received[3][:, 1280:].reshape(6, 256)
    same = (wider - y_sizes.reshape(6, 256)).abs().sum(-1) < 1e-6
    assert same.tolist() == [True, False, True, True, True, False]


def test_sdxl_stage2_trains_on_each_prompts_pooled_text(sdxl_model, sdxl_clip):
    """Every UNet call of stage 2 on SDXL (the examples drawn before training, on-policy pictures,
    the erase, adversarial and preserve terms) gets the pooled text of the prompt it is about, as
    stage 0 encoded it, and the size embeddings of the latent: never the zeros sampling never
    feeds an SDXL."""
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    network = comfy_models.network_of(sdxl_model, sdxl_clip, resolution=64)
    request = ace.concepts.parse_request("vincent van gogh", "a painting")
    closed = ace.erasure.erase(network, request, training=ace.finetune.FinetuneConfig(steps=0),
                               expansion=ace.expansion.ExpansionConfig(enabled=False))
    tokens = ace.erasure.request_tokens(network, closed.request)
    [concept] = tokens.concepts
    # stage 0 keeps each prompt's pooled text, as CLIP Text Encode computes it for that prompt
    assert concept.concept_pooled.shape == (len(concept.prompts), 1280)
    _, expected = network.encoder.encode_pooled(concept.prompts[:2])
    assert torch.allclose(concept.concept_pooled[:2], expected.float(), atol=1e-5)
    assert tokens.preserve_pooled.shape == (len(tokens.preserve_prompts), 1280)
    known = torch.cat([concept.concept_pooled, concept.neutral_pooled, tokens.preserve_pooled])

    received = []
    label_emb = sdxl_model.model.diffusion_model.label_emb
    hook = label_emb.register_forward_hook(lambda module, inputs, output: received.append(inputs[0].detach().cpu()))
    try:
        ace.erasure.fine_tune(closed, network, ace.finetune.FinetuneConfig(
            steps=2, images_per_concept=1, attack_steps=1, on_policy_every=1, batch_size=2))
    finally:
        hook.remove()
    rows = torch.cat(received).float()
    assert len(received) > 10 and len(rows) > 20
    pooled_part, size_part = rows[:, :1280], rows[:, 1280:]
    # each row's pooled text is one of the request's prompts' (the soft word keeps its prompt's)
    # (the UNet gets it in its own dtype: within that rounding)
    distance = torch.cdist(pooled_part, known).min(dim=1).values / pooled_part.norm(dim=1)
    assert distance.max() < 1e-2, distance.max()
    assert (pooled_part.norm(dim=1) > 1).all()
    # sizes of a 64x64 picture, as in sampling
    x = torch.zeros(1, 4, 8, 8)
    sizes = comfy_models.adm_conditioning(sdxl_model.model, x, concept.concept_pooled[:1])[:, 1280:]
    assert torch.allclose(size_part, sizes.float().expand_as(size_part), atol=1e-5)


def test_pooled_conditioning_batches_one_row_per_example(sdxl_model, sdxl_clip):
    comfy_models = pack().nodes.comfy_models
    encoder = comfy_models.text_encoder(sdxl_model, sdxl_clip)
    _, pooled = encoder.encode_pooled(["a cat", "a dog"])
    x = torch.zeros(2, 4, 8, 8)
    y = comfy_models.adm_conditioning(sdxl_model.model, x, pooled)
    assert y.shape == (2, 2816)
    assert torch.equal(y[:, :1280], pooled) and torch.equal(y[0, 1280:], y[1, 1280:])
    assert comfy_models.adm_conditioning(tiny_sd2_model().model, x, None) is None  # SD2 takes no y


def unet_output(model, x, sigma, context):
    """The raw UNet prediction (epsilon or v) of a loaded model, with ComfyUI's input scaling."""
    base = model.model
    sampling = base.model_sampling
    with torch.no_grad():
        xc = sampling.calculate_input(sigma, x)
        return base.diffusion_model(xc, sampling.timestep(sigma).float(), context=context).float()


@pytest.mark.parametrize("how", ["checkpoint", "ModelSamplingDiscrete"])
def test_sd2_v_prediction_goes_through_comfyui_model_sampling(sd2_clip, how):
    """Stage 2's denoiser turns a v-prediction UNet's output into x_0 as ComfyUI's V_PREDICTION
    sampling does, whether the model was loaded as v-prediction or switched to it by the
    ModelSamplingDiscrete node (as users do for v-prediction fine-tunes); an epsilon model with
    the same weights gives another x_0."""
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    eps = tiny_sd2_model()
    if how == "checkpoint":
        v_model = tiny_sd2_model(v_prediction=True)
    else:
        (v_model,) = ModelSamplingDiscrete().patch(eps, "v_prediction", False)
    assert isinstance(v_model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert not isinstance(eps.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    request = ace.concepts.parse_request("vincent van gogh", "a painting")
    device = v_model.load_device
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    sigma = torch.tensor([3.0], device=device)
    outputs = {}
    for name, model in (("v", v_model), ("eps", eps)):
        network = comfy_models.network_of(model, sd2_clip, resolution=64)
        closed = ace.erasure.erase(network, request, training=ace.finetune.FinetuneConfig(steps=0))
        context = network.encoder.encode([PROMPT]).to(device)
        with network.attach(closed.adapter) as denoise, closed.adapter.disabled():
            outputs[name] = denoise(x, sigma, context)
            raw = unet_output(model, x, sigma, context)
        outputs[name + "_raw"] = raw
    s, s_data = sigma.view(-1, 1, 1, 1), 1.0
    v_x0 = x * s_data ** 2 / (s ** 2 + s_data ** 2) - outputs["v_raw"] * s * s_data / (s ** 2 + s_data ** 2) ** 0.5
    eps_x0 = x - outputs["eps_raw"] * s
    assert torch.allclose(outputs["v_raw"], outputs["eps_raw"])  # the same UNet weights
    assert torch.allclose(outputs["v"], v_x0, rtol=1e-4, atol=1e-5)
    assert torch.allclose(outputs["eps"], eps_x0, rtol=1e-4, atol=1e-5)
    assert (outputs["v"] - outputs["eps"]).abs().mean() > 0.1
    # and stage 2 trains at the v-prediction model's own noise levels
    sampling = v_model.get_model_object("model_sampling")
    network = comfy_models.network_of(v_model, sd2_clip, resolution=64)
    assert network.train_sigmas.max() <= float(sampling.sigma_max) + 1e-3
    assert network.train_sigmas.min() >= float(sampling.sigma_min) - 1e-3
    # with the loss weight each was trained with, on the denoised estimate: v-prediction's
    # (σ² + 1)/σ² (σ_data 1), ε's 1/σ²
    s = network.train_sigmas
    assert torch.allclose(network.train_weights, (s.square() + 1) / s.square())
    eps_network = comfy_models.network_of(eps, sd2_clip, resolution=64)
    assert torch.allclose(eps_network.train_weights, 1 / eps_network.train_sigmas.square())
