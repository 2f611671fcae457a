"""Stage 0 and stage 1 through ComfyUI's own SD2 and SDXL text encoders.

The CLIPs are ComfyUI's classes as its checkpoint loader builds them (`SD2ClipModel` with
OpenCLIP-H's tokenizer; `SDXLClipModel` with CLIP-L and CLIP-G side by side), random and cut to 3
layers (`comfy_harness.tiny_sd2_clip` / `tiny_sdxl_clip`): the token layout is the real one,
start and end tokens, padding with the end token (CLIP-L) or with token 0 (OpenCLIP-H, CLIP-G),
77-token windows, and SDXL's two towers joined along the width.
"""
from __future__ import annotations

import pytest
import torch

from comfy_harness import pack

START, END = 49406, 49407
CONCEPT, ANCHOR = "vincent van gogh", "a painting"  # the anchor is shorter: no position is clipped


def token_ids(clip, prompt: str, tower: str) -> list[int]:
    """The ids of a prompt's first window in one tower of a ComfyUI CLIP, as CLIP Text Encode sees them."""
    return [t[0] for t in clip.tokenize(prompt)[tower][0]]


def collected(model, clip):
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    encoder = comfy_models.text_encoder(model, clip)
    concept = ace.concepts.parse_request(CONCEPT, ANCHOR).concepts[0]
    return encoder, concept, ace.tokens.collect_concept(encoder, concept)


def check_positions(clip, tower: str, tokens, pad: int) -> None:
    """Per template: stage 0 collects the concept's tokens and every position after them (end token
    and padding included), each paired with the position that holds the same token in the neutral
    prompt: the end token with the anchor's end token, padding with padding, the words after the
    concept with the same words after the anchor."""
    phrase_ids = token_ids(clip, CONCEPT, tower)[1:token_ids(clip, CONCEPT, tower).index(END)]
    assert len(phrase_ids) == 3  # vincent, van, gogh
    for t, (prompt, neutral) in enumerate(zip(tokens.prompts, tokens.neutral_prompts)):
        ids, neutral_ids = token_ids(clip, prompt, tower), token_ids(clip, neutral, tower)
        assert len(ids) == 77 and ids[0] == START
        rows = tokens.concept_index[:, 0] == t
        positions = tokens.concept_index[rows, 1].tolist()
        paired = tokens.neutral_index[rows, 1].tolist()
        is_phrase = tokens.is_phrase[rows].tolist()
        start = positions[0]
        assert positions == list(range(start, 77))
        assert ids[start:start + 3] == phrase_ids and is_phrase == [True] * 3 + [False] * (77 - start - 3)
        end = ids.index(END)
        assert end >= start + 3 and not is_phrase[end - start]
        assert neutral_ids[paired[end - start]] == END  # the end token pairs with the anchor's end token
        assert set(ids[end + 1:]) == {pad}  # the tower's padding, all collected
        assert all(ids[p] == neutral_ids[q] for p, q, f in zip(positions, paired, is_phrase) if not f)


def test_sd2_openclip_end_token_and_zero_padding_are_collected_and_paired(sd2_model, sd2_clip):
    encoder, concept, tokens = collected(sd2_model, sd2_clip)
    assert type(sd2_clip.cond_stage_model).__name__ == "SD2ClipModel"
    check_positions(sd2_clip, "h", tokens, pad=0)
    # the collected embeddings are what CLIP Text Encode gives the UNet for these prompts
    for t, prompt in enumerate(tokens.prompts):
        cond = sd2_clip.encode_from_tokens(sd2_clip.tokenize(prompt))
        assert torch.allclose(tokens.concept_context[t], cond[0].float().cpu(), rtol=1e-4, atol=1e-4)
    assert tokens.concept_context.shape[1:] == (77, 1024)
    context, pooled = encoder.encode_pooled(["a photo of a dog"])
    assert pooled is None and context.shape == (1, 77, 1024)  # SD2 takes no pooled text


def test_sdxl_both_towers_are_collected_at_the_same_positions(sdxl_model, sdxl_clip):
    encoder, concept, tokens = collected(sdxl_model, sdxl_clip)
    assert type(sdxl_clip.cond_stage_model).__name__ == "SDXLClipModel"
    check_positions(sdxl_clip, "l", tokens, pad=END)  # CLIP-L pads with its end token
    check_positions(sdxl_clip, "g", tokens, pad=0)  # CLIP-G pads with token 0
    towers = sdxl_clip.cond_stage_model
    sdxl_clip.load_model()
    for t, prompt in enumerate(tokens.prompts):
        l_ids, g_ids = token_ids(sdxl_clip, prompt, "l"), token_ids(sdxl_clip, prompt, "g")
        end = l_ids.index(END)
        assert l_ids[:end + 1] == g_ids[:end + 1]  # the same words at the same positions in both towers
        # each tower alone, as ComfyUI runs it (its default layer, the penultimate)
        towers.reset_clip_options()
        window = sdxl_clip.tokenize(prompt)
        l_out, _ = towers.clip_l.encode_token_weights(window["l"])
        g_out, g_pooled = towers.clip_g.encode_token_weights(window["g"])
        row = tokens.concept_context[t]
        assert torch.allclose(row[:, :768], l_out[0].float().cpu(), rtol=1e-4, atol=1e-4)
        assert torch.allclose(row[:, 768:], g_out[0].float().cpu(), rtol=1e-4, atol=1e-4)
        # the pooled text next to it: CLIP-G's projected pooled output, as CLIP Text Encode gives it
        context, pooled = encoder.encode_pooled([prompt])
        [[cond, extras]] = sdxl_clip.encode_from_tokens_scheduled(sdxl_clip.tokenize(prompt))
        assert pooled.shape == (1, 1280)
        assert torch.allclose(pooled.cpu(), g_pooled.float().cpu(), rtol=1e-4, atol=1e-4)
        assert torch.allclose(pooled.cpu(), extras["pooled_output"].float().cpu(), rtol=1e-4, atol=1e-4)
        assert torch.allclose(context.cpu(), cond.float().cpu(), rtol=1e-4, atol=1e-4)
    # encoded together, every prompt gets the pooled vector it gets alone (ComfyUI's batch call
    # returns the first one's only)
    _, batched = encoder.encode_pooled(tokens.prompts[:3])
    for i, prompt in enumerate(tokens.prompts[:3]):
        assert torch.allclose(batched[i], encoder.encode_pooled([prompt])[1][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_sd15_clip_takes_no_pooled_text(tiny_sd15):
    model, clip, _ = tiny_sd15
    encoder = pack().nodes.comfy_models.text_encoder(model, clip)
    context, pooled = encoder.encode_pooled(["a dog", "a cat"])
    assert pooled is None and context.shape == (2, 77, 768)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_closed_form_and_gate_on_the_real_encoders(request, family):
    """Stage 1 on the in-memory SD2/SDXL models with their real encoders: the gate opens on the
    concept's tokens (also in a wording stage 0 never saw) and stays shut on the everyday prompts
    it was calibrated against; the edit moves the concept's keys and values towards the anchor's;
    the erased model changes its prediction for the concept and keeps it for an everyday prompt.
    (How shut the gate stays on words stage 0 never saw depends on what the encoder learnt, which
    random weights cannot show.)"""
    model, clip = request.getfixturevalue(f"{family}_model"), request.getfixturevalue(f"{family}_clip")
    import comfy.model_management

    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    network = comfy_models.network_of(model, clip, resolution=64)
    request_ = ace.concepts.parse_request(CONCEPT, ANCHOR, "monet")
    tokens = ace.tokens.collect_request(network.encoder, request_)
    closed = ace.closed_form.closed_form_erasure(tokens, network.weights, network.projections,
                                                 ace.closed_form.ClosedFormConfig(rank=8))
    gate = closed.adapter.gate
    concept = tokens.concepts[0]
    with torch.no_grad():
        assert gate(concept.C[concept.is_phrase]).mean() > 0.9
        assert (gate(tokens.P) > 0.5).float().mean() < 0.01
        prompts = network.encoder.encode([f"an old sketch of {CONCEPT} on paper", "a dog running on the beach"])
        start = 1 + network.encoder.count_tokens("an old sketch of")
        assert gate(prompts[0, start:start + 3]).min() > 0.5  # the concept's tokens, in a new wording
        assert gate(prompts[1]).max() < 0.1  # no token of an everyday prompt
    assert closed.stats[0]["relative_residual"] < 0.95  # closer to the anchor than before (1.0)

    erasure = ace.erasure.Erasure(family, request_, closed.adapter, network.num_res_blocks)
    erased = comfy_models.with_erasure(model, erasure, 1.0)
    device = model.load_device
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor([2.0, 2.0], device=device)
    context = prompts.to(device)
    outs = []
    for m in (model, erased):
        comfy.model_management.load_models_gpu([m])
        y = comfy_models.adm_conditioning(m.model, x, None)
        outs.append(m.model.apply_model(x, sigma, c_crossattn=context, **({} if y is None else {"y": y})).float())
    change = (outs[1] - outs[0]).abs().flatten(1).mean(1)
    assert change[0] > 1e-3 and change[1] < 0.05 * change[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_expansion_runs_through_comfyuis_unet_and_its_gradient_is_the_response_slope(request, family):
    """Expansion on ComfyUI's own models (SD1.5 from the tiny checkpoint; SDXL in memory, with its
    pooled text): the response gradient is taken through ComfyUI's UNet with the weights as its
    loader left them, it matches the slope measured by finite differences, no weight of the model
    gets a gradient or changes, and the response test runs on the candidates it brought."""
    if family == "sd15":
        model, clip, _ = request.getfixturevalue("tiny_sd15")
    else:
        model, clip = request.getfixturevalue("sdxl_model"), request.getfixturevalue("sdxl_clip")
    import comfy.model_management

    comfy_models, expansion = pack().nodes.comfy_models, pack().ace.expansion
    network = comfy_models.network_of(model, clip, resolution=64)
    before = {k: v.detach().clone() for k, v in network.weights.items()}
    encoder, sigmas, draws = network.encoder, network.sample_sigmas[2:4], 2
    prompt, neutral = "a vincent", "a painting"
    position = encoder.start_tokens + encoder.count_tokens(prompt) - 1
    contexts, pooled = encoder.encode_pooled([prompt, neutral])
    comfy.model_management.load_models_gpu([model])
    with network.attach(pack().ace.adapter.ProjectionEdit([])) as denoise, torch.inference_mode():
        # in inference mode, as ComfyUI's executor runs every node
        gradient = expansion.response_gradient(denoise, encoder, prompt, position, neutral, sigmas,
                                               network.latent_shape, draws, network.device)
        assert torch.isfinite(gradient).all() and gradient.norm() > 0

        def along(shift: float) -> float:  # Σ ⟨D(context with the word's row moved), response⟩
            device = network.device
            context, neutral_context = (c.to(device).expand(draws, -1, -1) for c in (contexts[:1], contexts[1:]))
            text, neutral_text = (None, None) if pooled is None else (p.to(device).expand(draws, -1) for p in (pooled[:1], pooled[1:]))
            moved = context.clone()
            moved[:, position] += shift * (gradient / gradient.norm()).to(device, moved.dtype)
            total = 0.0
            with torch.no_grad():
                for x, s in expansion.noisy_inputs(sigmas, network.latent_shape, draws, device):
                    response = denoise(x, s, context, text) - denoise(x, s, neutral_context, neutral_text)
                    total += (denoise(x, s, moved, text).double() * response.double()).sum().item()
            return total

        step = 1e-2 * contexts[0, position].norm().item()
        slope = (along(step) - along(-step)) / (2 * step)
        assert slope == pytest.approx(gradient.norm().item(), rel=0.05)
    assert all(p.grad is None for p in model.model.diffusion_model.parameters())
    with torch.inference_mode():
        found = expansion.expand(network, pack().ace.concepts.parse_request("vincent", "a painting", "monet"),
                                 expansion.ExpansionConfig(scan=16, candidates=2, gradient_candidates=2, noise_draws=2))
    assert set(found.seconds) == {"scan", "gradient", "response"} and found.closest_kept["vincent"][0] == "monet"
    for key, weight in comfy_models.projection_weights(model, network.projections).items():
        assert torch.equal(weight, before[key])
