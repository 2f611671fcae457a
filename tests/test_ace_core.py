"""The algorithm in `ace/` on plain-torch stand-ins (no ComfyUI): stages 0-2, the adapter, files."""
import copy
import math

import pytest
import torch

from ace.closed_form import ClosedFormConfig, closed_form_erasure
from ace.concepts import ConceptError, parse_request
from ace.erasure import Erasure, erase
from ace.families import UnsupportedModelError, cross_attention_projections
from ace.files import ErasureFileError, check_file_name, load_erasure, save_erasure
from ace.finetune import FinetuneConfig, finetune, sample_latents
from ace.tokens import collect_request
from toys import SAMPLE_SIGMAS, TRAIN_SIGMAS, ToyTextEncoder, ToyUNet, toy_network


@pytest.fixture(scope="module")
def encoder():
    return ToyTextEncoder(synonyms={"snoopy": "beagle"})


@pytest.fixture()
def unet():
    net = ToyUNet()
    net.requires_grad_(False)
    return net


def weights_of(unet):
    projections = cross_attention_projections(unet)
    modules = dict(unet.named_modules())
    return projections, {p.name: modules[p.name].weight for p in projections}


def stage1(encoder, unet, text="beagle: snoopy", anchor="a dog", preserve="cat, tree", **cfg):
    request = parse_request(text, anchor, preserve)
    tokens = collect_request(encoder, request)
    projections, weights = weights_of(unet)
    result = closed_form_erasure(tokens, weights, projections, ClosedFormConfig(**cfg))
    return request, tokens, result.adapter, result


# --- requests ---------------------------------------------------------------------------------

def test_request_parsing_and_validation():
    request = parse_request("Van Gogh: Vincent van Gogh, van gogh style\n\n# a comment\nSnoopy", "a painting", "Monet,\nRembrandt")
    assert [c.target for c in request.concepts] == ["Van Gogh", "Snoopy"]
    assert request.concepts[0].synonyms == ("Vincent van Gogh", "van gogh style")
    assert request.concepts[0].anchor == "a painting"
    assert request.preserve == ("Monet", "Rembrandt")
    cases = [
        ("", "", "", "No concept to erase"),
        ("  : synonym", "", "", "Concept 1 is empty"),
        ("a painting", "a painting", "", "is its own anchor"),
        ("cat\nCat", "", "", "requested twice"),
        ("cat", "", "cat", "both erased and preserved"),
        ("x" * 300, "", "", "characters long"),
        ("\n".join(f"c{i}" for i in range(101)), "", "", "at most 100"),
    ]
    for text, anchor, preserve, message in cases:
        with pytest.raises(ConceptError, match=message):
            parse_request(text, anchor, preserve)


def test_config_validation():
    with pytest.raises(ValueError, match="rank must be an integer from 1"):
        ClosedFormConfig(rank=0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        FinetuneConfig(steps=-1)
    with pytest.raises(ValueError, match="learning rate"):
        FinetuneConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="preserve anchor must be one of zero, start, start_on_everyday, got 'yes'"):
        FinetuneConfig(preserve_anchor="yes")
    with pytest.raises(ValueError, match="restart every must be an integer from 0 to 100000, got -1"):
        FinetuneConfig(restart_every=-1)
    with pytest.raises(ValueError, match="restart attack steps must be an integer from 0 to 10000, got 2.5"):
        FinetuneConfig(restart_attack_steps=2.5)
    with pytest.raises(ValueError, match="loss weighting must be one of noise, model, got 'edm'"):
        FinetuneConfig(loss_weighting="edm")


# --- stage 0 ------------------------------------------------------------------------------------

def test_tokens_pair_concept_and_neutral_positions_after_the_concept(encoder):
    request = parse_request("van gogh", "a painting")  # 2 tokens onto 2 tokens
    tokens = collect_request(encoder, request, templates=("a photo of {} today",))
    c = tokens.concepts[0]
    # BOS a photo of | van gogh | today EOS...: the concept starts at position 4
    rows = c.concept_index.tolist()
    assert rows[0] == [0, 4] and c.neutral_index[0].tolist() == [0, 4]
    assert c.is_phrase.tolist()[:3] == [True, True, False]
    assert c.concept_mask[0, :4].sum() == 0 and c.concept_mask[0, 4:].all()
    # "today" follows the concept at 6 and the anchor at 6; the neutral prompt uses the anchor
    assert rows[2] == [0, 6] and c.neutral_index[2].tolist() == [0, 6]
    assert c.neutral_prompts == ["a photo of a painting today"]
    # an anchor of another length: positions after it are aligned by offset, not by index
    tokens = collect_request(encoder, parse_request("van gogh", "art"), templates=("a photo of {} today",))
    c = tokens.concepts[0]
    assert c.neutral_index[2].tolist() == [0, 5]  # "today" after the 1-token anchor
    assert torch.equal(c.N[2], c.neutral_context[0, 5])


def test_empty_anchor_maps_onto_the_prompt_without_the_concept(encoder):
    tokens = collect_request(encoder, parse_request("beagle"), templates=("a photo of {}",))
    assert tokens.concepts[0].neutral_prompts == ["a photo of"]
    assert tokens.P.shape[1] == 64


def test_everyday_prompts_naming_an_erased_concept_are_not_preserved(encoder):
    tokens = collect_request(encoder, parse_request("Cat: red car", preserve_text="dog"))
    kept = [p for p in tokens.preserve_prompts if "dog" not in p.split()]
    assert "a cat sleeping on a sofa" not in kept and "a red car parked by the road" not in kept
    assert "a dog running on the beach" in tokens.preserve_prompts  # kept: only erased phrases are dropped
    assert "a portrait of a woman smiling" in tokens.preserve_prompts
    assert len(tokens.preserve_prompts) == len(tokens.preserve_context)


# --- stage 1 ------------------------------------------------------------------------------------

def test_closed_form_maps_concept_onto_neutral_and_leaves_preserve(encoder, unet):
    _, tokens, adapter, info = stage1(encoder, unet, rank=16)
    stats = info.stats[0]
    assert stats["relative_residual"] < 0.2  # concept outputs moved most of the way to neutral
    assert stats["gate_margin"] > 0  # concept and preserve tokens separable
    concept = tokens.concepts[0]
    projections, weights = weights_of(unet)
    # gated edit: concept's own tokens edited, preserve tokens not
    C, N, P = concept.C[concept.is_phrase], concept.N[concept.is_phrase], tokens.P
    for i, p in enumerate(projections):
        W = weights[p.name]
        edited_C = C @ W.T + adapter.delta(i, C)
        assert (edited_C - N @ W.T).norm() < 0.25 * (C @ W.T - N @ W.T).norm()
        assert adapter.delta(i, P).norm() < 0.02 * (P @ W.T).norm()
    gate = adapter.gate(concept.C)[:, 0]
    assert gate[concept.is_phrase].min() > 0.9
    assert adapter.gate(tokens.P).max() < 0.1


def test_kept_concepts_are_weighed_on_their_own(encoder, unet):
    """A near concept the request keeps ("snoopy", 0.8 of beagle's vector) is a few rows among the
    preserve pool: weighed on its own (λ_k), the edit moves its keys and values less the more it
    weighs, and the erased concept is still mapped most of the way to neutral."""
    from ace.tokens import CONCEPT_TEMPLATES

    moved, residual = {}, {}
    for weight in (0.0, 0.4, 4.0):
        _, tokens, adapter, info = stage1(encoder, unet, text="beagle", preserve="snoopy, cat, tree", rank=16,
                                          kept_weight=weight)
        # the kept concepts' positions: from their word to the end, in their templated prompts only
        kept_prompts = 3 * len(CONCEPT_TEMPLATES)
        assert tokens.kept_mask[:kept_prompts].any(1).all() and not tokens.kept_mask[kept_prompts:].any()
        K = tokens.K
        projections, weights = weights_of(unet)
        moved[weight] = sum(adapter.delta(i, K).norm() ** 2 for i in range(len(projections))).sqrt() \
            / sum((K @ weights[p.name].T).norm() ** 2 for p in projections).sqrt()
        residual[weight] = info.stats[0]["relative_residual"]
    assert moved[0.4] < 0.85 * moved[0.0] and moved[4.0] < 0.4 * moved[0.0], moved
    assert max(residual.values()) < 0.3, residual


def test_gate_catches_the_concept_in_unseen_prompts_and_ignores_others(encoder, unet):
    _, _, adapter, _ = stage1(encoder, unet)
    e = encoder.encode(["my beagle on the grass", "snoopy runs", "a horse on the grass"])
    g = adapter.gate(e)[..., 0]
    assert g[0, 2] > 0.9  # "beagle" in a prompt no template wrote
    assert g[1, 1] > 0.9  # its synonym
    assert g[2].max() < 0.05


def test_closed_gates_shut_gives_the_base_output_exactly(encoder, unet):
    _, tokens, adapter, _ = stage1(encoder, unet)
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([1.0, 2.0])
    ctx = tokens.concepts[0].concept_context[:2]
    base = unet(x, sigma, ctx)
    with adapter.attached(unet):
        with torch.no_grad():
            adapter.gate_threshold.fill_(1e6)  # every gate at 0
        assert torch.equal(unet(x, sigma, ctx), base)
        adapter.gate_threshold.data.fill_(-1e6)  # every gate open: the edit changes the output
        assert not torch.allclose(unet(x, sigma, ctx), base)
        with adapter.disabled():
            assert torch.equal(unet(x, sigma, ctx), base)
    assert torch.equal(unet(x, sigma, ctx), base)  # detached: the network is as before
    assert "forward" not in dict(unet.named_modules())[adapter.projections[0].name].__dict__


def test_prompt_scoped_gate_edits_every_position_of_a_prompt_with_the_concept(encoder, unet):
    _, _, adapter, _ = stage1(encoder, unet)
    e = encoder.encode(["my beagle on the grass", "a horse on the grass"])  # [2, L, d]
    token = adapter.delta(0, e)
    adapter.gate_scope = "prompt"
    prompt = adapter.delta(0, e)
    g = adapter.gate(e)[..., 0]
    full = torch.einsum("bld,rd,or->blo", e, adapter.lora_down[0], adapter.lora_up[0])
    # the concept's prompt: every position gets the edit at the prompt's largest gate
    assert torch.allclose(prompt[0], g[0].max() * full[0], atol=1e-5)
    assert (prompt[0, 0] - token[0, 0]).abs().max() > 0.1 * full[0, 0].abs().max()  # "my": before, shut per token
    # a prompt without the concept: its largest gate is shut, so the whole prompt stays shut
    assert g[1].max() < 0.05
    assert prompt[1].abs().max() < 0.05 * full[1].abs().max()
    with pytest.raises(ValueError, match="gate scope"):
        type(adapter)(adapter.projections, adapter.gate_basis, adapter.gate_center, adapter.gate_threshold,
                      adapter.gate_log_temperature, list(adapter.lora_down), list(adapter.lora_up), gate_scope="word")


def test_strength_scales_the_edit(encoder, unet):
    _, tokens, adapter, _ = stage1(encoder, unet)
    C = tokens.concepts[0].C
    full = adapter.delta(0, C)
    adapter.strength = 0.5
    assert torch.allclose(adapter.delta(0, C), 0.5 * full, atol=1e-6)


def test_adapter_follows_input_dtype_and_device(encoder, unet):
    _, tokens, adapter, _ = stage1(encoder, unet)
    C = tokens.concepts[0].C
    for dtype in (torch.float16, torch.bfloat16):
        out = adapter.delta(0, C.to(dtype))
        assert out.dtype == dtype
        assert torch.allclose(out.float(), adapter.delta(0, C), rtol=0.05, atol=0.05 * adapter.delta(0, C).abs().max().item())


def test_change_gate_opens_where_the_edit_matters_even_when_the_concept_gate_is_shut(encoder, unet):
    """The change gate is calibrated shut on 90% of preserve tokens; a concept token pushed out of
    its gate's directions (what the 4x attack does) shuts the concept gate but not the change gate,
    so it still gets the edit."""
    from ace.closed_form import preserve_tokens

    _, tokens, adapter, _ = stage1(encoder, unet, change_quantile=0.9)
    projections, weights = weights_of(unet)
    preserve = preserve_tokens(tokens)
    assert adapter.has_change_gate and adapter.change_quantile == 0.9
    concept = tokens.concepts[0]
    C = concept.C[concept.is_phrase]
    basis = torch.linalg.qr(adapter.gate_basis[0])[0]
    centred = C - adapter.gate_center[0]
    escaped = C - (centred @ basis) @ basis.T  # no component left along the gate's directions
    assert adapter.gate(escaped)[:, 0].max() < 0.05 < 0.9 < adapter.gate(C)[:, 0].min()
    for i, p in enumerate(projections):
        W = weights[p.name]
        open_edit = (escaped @ adapter.lora_down[i].T) @ adapter.lora_up[i].T
        assert adapter.delta(i, escaped).norm() < 0.05 * open_edit.norm()  # without the output: concept gate alone
        with_change_gate = adapter.delta(i, escaped, escaped @ W.T)
        assert with_change_gate.norm() > 0.9 * open_edit.norm()
        shut = adapter.change_gate(i, (preserve @ adapter.lora_down[i].T) @ adapter.lora_up[i].T, preserve @ W.T)
        assert (shut < 0.5).float().mean() == pytest.approx(0.9, abs=0.01)
    off = stage1(encoder, unet)[2]  # the default: no change gate
    assert not off.has_change_gate
    assert torch.equal(off.delta(0, escaped, escaped @ weights[projections[0].name].T), off.delta(0, escaped))
    with pytest.raises(ValueError, match="change quantile"):
        ClosedFormConfig(change_quantile=0.0)


def test_outlier_gate_opens_on_tokens_unlike_any_kept_one_even_when_the_concept_gate_is_shut(encoder, unet, tmp_path):
    """The outlier gate is calibrated to 0.05 at the 0.999 quantile of the preserve and kept tokens'
    scores; a concept token pushed out of its gate's directions and far off the pool (what the 4x
    attack's words are) shuts the concept gate but not the outlier gate, so it still gets the edit.
    The file keeps it; a file without it loads without."""
    from ace.closed_form import preserve_tokens

    _, tokens, adapter, _ = stage1(encoder, unet, outlier_quantile=0.999)
    assert adapter.has_outlier_gate and adapter.outlier_quantile == 0.999
    kept = preserve_tokens(tokens)
    assert adapter.outlier_gate(kept).squeeze(-1).gt(0.05).float().mean().item() == pytest.approx(0.001, abs=0.002)
    concept = tokens.concepts[0]
    C = concept.C[concept.is_phrase]
    basis = torch.linalg.qr(adapter.gate_basis[0])[0]
    escaped = C - ((C - adapter.gate_center[0]) @ basis) @ basis.T
    escaped = escaped + 3 * (escaped - adapter.gate_center[0])  # four times as far from the pool's centre
    assert adapter.gate(escaped)[:, 0].max() < 0.05
    assert adapter.outlier_gate(escaped).min() > 0.95
    open_edit = (escaped @ adapter.lora_down[0].T) @ adapter.lora_up[0].T
    assert torch.allclose(adapter.delta(0, escaped), open_edit, rtol=0.05, atol=0.05 * open_edit.abs().max().item())
    off = stage1(encoder, unet)[2]  # the default: no outlier gate
    assert not off.has_outlier_gate and off.delta(0, escaped).norm() < 0.05 * open_edit.norm()
    erasure = Erasure("ace-toy", parse_request("beagle", "a dog", "cat"), adapter, 1)
    path = str(tmp_path / "outlier.safetensors")
    save_erasure(erasure, path)
    loaded = load_erasure(path).adapter
    assert loaded.outlier_threshold == adapter.outlier_threshold and loaded.outlier_quantile == 0.999
    assert torch.equal(loaded.outlier_gate(escaped), adapter.outlier_gate(escaped))
    save_erasure(Erasure("ace-toy", erasure.request, off, 1), path)
    assert not load_erasure(path).adapter.has_outlier_gate
    with pytest.raises(ValueError, match="outlier quantile"):
        ClosedFormConfig(outlier_quantile=1.5)


# --- several concepts -------------------------------------------------------------------------

def test_one_joint_edit_fits_every_concept_and_routes_their_gates(unet):
    encoder = ToyTextEncoder(width=384)
    net = ToyUNet(context=384)
    request, tokens, adapter, info = stage1(encoder, net, text="beagle\nvan gogh\nsnoopy", anchor="", preserve="cat, tree")
    assert adapter.num_gates == 3 and len(adapter.lora_down) == len(adapter.projections)
    assert adapter.rank == 3 * 64  # rank per concept times concepts
    for stats in info.stats:  # the joint edit fits each concept about as well as an edit for it alone
        alone = stage1(encoder, net, text=stats["concept"], anchor="", preserve="cat, tree")[3].stats[0]
        assert stats["relative_residual"] < alone["relative_residual"] + 0.03, (stats, alone)
        assert stats["ungated_preserve_change"] < 0.1
    # The largest gate decides: a token two gates open on gets the edit once, not twice.
    e = tokens.concepts[0].C[tokens.concepts[0].is_phrase]
    g = adapter.gate(e)
    routed = adapter.routed_gate(e)
    assert torch.allclose(routed[:, 0], g.max(dim=1).values)
    full = (e @ adapter.lora_down[0].T) @ adapter.lora_up[0].T
    assert torch.allclose(adapter.delta(0, e), routed * full, atol=1e-5)
    assert (routed <= 1).all()


def test_many_concepts_share_one_batched_operation():
    encoder, unet = ToyTextEncoder(width=384), ToyUNet(context=384)
    text = "\n".join(f"concept{i}" for i in range(40))
    _, tokens, adapter, _ = stage1(encoder, unet, text=text, anchor="", preserve="", adversarial_rounds=0)
    assert adapter.num_gates == 40 and adapter.rank == 256  # the joint edit's rank is capped
    g = adapter.gate(tokens.concepts[7].C[tokens.concepts[7].is_phrase])
    assert g[:, 7].min() > 0.9


def test_adversarial_embeddings_reproduce_the_concept_through_the_edit(encoder, unet):
    """RECE's closed form: through the edited weights, the adversarial embedding gives back (most of)
    the original keys and values of the concept token it was made from; the rounds then erase it."""
    from ace.closed_form import adversarial_embeddings, projection_gram, solve_edit

    request, tokens, _, _ = stage1(encoder, unet, adversarial_rounds=0)
    projections, weights = weights_of(unet)
    Ws = [weights[p.name].double() for p in projections]
    concept = tokens.concepts[0]
    C, N = concept.C[concept.is_phrase].double(), concept.N[concept.is_phrase].double()
    P = tokens.P.double()
    from ace.closed_form import ClosedFormConfig as Config

    M = solve_edit(C, N, P.T @ P / len(P), Config().ridge)
    I = torch.eye(M.shape[0], dtype=torch.float64)
    adversarial = adversarial_embeddings(C, projection_gram(Ws), M)

    def gap(E):  # how far the edited keys/values of E are from the original ones of C
        return sum(((E @ (W @ (I + M)).T) - C @ W.T).norm() for W in Ws) / sum((C @ W.T).norm() for W in Ws)

    assert gap(adversarial) < 0.5 * gap(C)  # the edit maps C away; the adversarial rows come back


# --- stage 2 ------------------------------------------------------------------------------------

def _latents(adapter, unet, tokens):
    with adapter.disabled():
        return [sample_latents(unet, c.concept_context[:4], (4, 8, 8), SAMPLE_SIGMAS) for c in tokens.concepts]


def _erase_gap(adapter, unet, tokens, latents, context=None):
    """How far the edited prediction for the concept is from the negative-guidance target."""
    c = tokens.concepts[0]
    gen = torch.Generator().manual_seed(123)
    x0 = latents[0]
    sigma = torch.full((len(x0),), 1.2)
    x_t = x0 + torch.randn(x0.shape, generator=gen) * 1.2
    ctx = c.concept_context[:4] if context is None else context
    with torch.no_grad():
        with adapter.disabled():
            concept, neutral = unet(x_t, sigma, c.concept_context[:4]), unet(x_t, sigma, c.neutral_context[:4])
        target = neutral - (concept - neutral)
        return ((unet(x_t, sigma, ctx) - target) ** 2).mean().item()


def test_finetuning_lowers_the_erase_loss_and_keeps_preserve(encoder, unet):
    _, tokens, adapter, _ = stage1(encoder, unet, rank=8)
    network = toy_network(unet, encoder)
    with adapter.attached(unet):
        latents = _latents(adapter, unet, tokens)
        before = _erase_gap(adapter, unet, tokens, latents)
        seen = []
        result = finetune(adapter, unet, network, tokens, latents, FinetuneConfig(steps=40, attack_steps=0), callback=seen.append)
        after = _erase_gap(adapter, unet, tokens, latents)
    assert len(seen) == 40 and seen[-1].step == 40 and set(seen[0].losses) == {"erase", "preserve", "gate", "total"}
    assert after < 0.8 * before
    assert all(math.isfinite(v) for h in result.history for v in h.values())
    # the gate stays shut on what is preserved: no token gets half the edit, under 2% a tenth of it
    # (measured: at most 0.21, 1.2% above 0.1)
    gate = adapter.gate(tokens.P)
    assert gate.max() < 0.5 and (gate > 0.1).float().mean() < 0.02


@pytest.mark.parametrize("anchor", ["zero", "start", "start_on_everyday"])
def test_stage_2s_open_gate_preservation_holds_the_edit_only_when_anchored_to_its_start(encoder, unet, anchor):
    # Measured from no edit, the open-gate preservation term pulls stage 1's edit of preserve
    # tokens towards zero and the whole edit shrinks with it; measured from the start, both stay;
    # measured from the start on everyday tokens only, the edit keeps its size on the concept and
    # is still pulled off the kept concepts' tokens.
    _, tokens, adapter, _ = stage1(encoder, unet, rank=8)

    def open_edit(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([((rows @ A.T) @ B.T).flatten() for A, B in zip(adapter.lora_down, adapter.lora_up)])

    concept = tokens.concepts[0].C
    preserve_before, concept_before, kept_before = open_edit(tokens.P), open_edit(concept), open_edit(tokens.K)
    with adapter.attached(unet):
        latents = _latents(adapter, unet, tokens)
        finetune(adapter, unet, toy_network(unet, encoder), tokens, latents,
                 FinetuneConfig(steps=40, attack_steps=0, preserve_anchor=anchor))
    preserve_change = (open_edit(tokens.P) - preserve_before).norm() / preserve_before.norm()
    concept_kept = open_edit(concept).norm() / concept_before.norm()
    kept_left = open_edit(tokens.K).norm() / kept_before.norm()
    measured = (round(preserve_change.item(), 3), round(concept_kept.item(), 3), round(kept_left.item(), 3))
    if anchor == "zero":  # measured 0.42, 0.92, 0.50
        assert preserve_change > 0.3 and concept_kept < 1.0 and kept_left < 0.75, measured
    elif anchor == "start":  # measured 0.20, 1.13, 1.05
        assert preserve_change < 0.3 and concept_kept > 1.0 and kept_left > 0.9, measured
    else:  # measured 0.24, 1.12, 0.58
        assert preserve_change < 0.3 and concept_kept > 1.0 and kept_left < 0.75, measured


@pytest.mark.parametrize("anchor", ["zero", "start", "start_on_everyday"])
def test_stage_2_trains_a_request_that_keeps_no_concept_under_every_anchor(encoder, unet, anchor):
    _, tokens, adapter, _ = stage1(encoder, unet, preserve="")
    assert not len(tokens.K)
    with adapter.attached(unet):
        latents = _latents(adapter, unet, tokens)
        result = finetune(adapter, unet, toy_network(unet, encoder), tokens, latents,
                          FinetuneConfig(steps=3, attack_steps=0, preserve_anchor=anchor))
    assert len(result.history) == 3 and all(math.isfinite(v) for h in result.history for v in h.values())


def test_the_budget_grows_with_the_request(encoder, unet):
    cfg = FinetuneConfig(steps=10, max_steps=25)
    assert [cfg.total_steps(k) for k in (1, 2, 3)] == [10, 20, 25]
    _, tokens, adapter, _ = stage1(encoder, unet, text="beagle\nvan gogh")
    with adapter.attached(unet):
        latents = _latents(adapter, unet, tokens)
        result = finetune(adapter, unet, toy_network(unet, encoder), tokens, latents, FinetuneConfig(steps=3, attack_steps=0))
    assert len(result.history) == 6


def test_callback_can_stop_training(encoder, unet):
    _, tokens, adapter, _ = stage1(encoder, unet)
    with adapter.attached(unet):
        latents = _latents(adapter, unet, tokens)
        result = finetune(adapter, unet, toy_network(unet, encoder), tokens, latents, FinetuneConfig(steps=50),
                          callback=lambda r: r.step >= 3)
    assert result.stopped_early and len(result.history) == 3


def test_finetuning_is_deterministic_on_cpu(encoder):
    runs = []
    for _ in range(2):
        net = ToyUNet()
        net.requires_grad_(False)
        _, tokens, adapter, _ = stage1(encoder, net)
        with adapter.attached(net):
            latents = _latents(adapter, net, tokens)
            finetune(adapter, net, toy_network(net, encoder), tokens, latents, FinetuneConfig(steps=5, seed=7))
        runs.append(adapter.lora_down[0].detach().clone())
    assert torch.equal(runs[0], runs[1])


def _worst_case(adapter, unet, encoder, tokens, latents, steps: int = 15) -> float:
    """The erase gap at the end of a fresh soft-word attack on the concept (what stage 2 trains against)."""
    from ace.finetune import SoftWord

    network = toy_network(unet, encoder)
    concept = tokens.concepts[0]
    texts = [concept.prompts[i] for i in concept.target_prompts()[:4]]
    soft = SoftWord(network, concept.concept.target, FinetuneConfig())
    x0 = latents[0]
    gen = torch.Generator().manual_seed(5)
    sigma = torch.full((len(x0),), 1.2)
    x_t = x0 + torch.randn(x0.shape, generator=gen) * 1.2
    with torch.no_grad(), adapter.disabled():
        original = unet(x_t, sigma, concept.concept_context[concept.target_prompts()[:4]])
    for _ in range(steps):
        loss = ((unet(x_t, sigma, encoder.encode_soft(texts, soft.phrase, soft.vectors)) - original) ** 2).mean()
        soft.optimizer.zero_grad()
        loss.backward()
        soft.optimizer.step()
    return _erase_gap(adapter, unet, tokens, latents, encoder.encode_soft(texts, soft.phrase, soft.vectors).detach())


def test_adversarial_training_lowers_the_worst_case_under_a_soft_word_attack(encoder, unet):
    worst = {}
    for name, weight in (("plain", 0.0), ("adversarial", 1.0)):
        _, tokens, adapter, _ = stage1(encoder, unet)
        with adapter.attached(unet):
            latents = _latents(adapter, unet, tokens)
            finetune(adapter, unet, toy_network(unet, encoder), tokens, latents,
                     FinetuneConfig(steps=60, adversarial_weight=weight, attack_steps=2))
            worst[name] = _worst_case(adapter, unet, encoder, tokens, latents)
    assert worst["adversarial"] < 0.9 * worst["plain"], worst


def test_model_loss_weighting_weighs_every_term_by_the_networks_training_weights(encoder, unet):
    """With `loss_weighting="model"` every loss of stage 2 weighs its noise level by
    `Network.train_weights`: weights of 3/σ² triple each term of the first step (the same draws,
    the same untrained adapter; Adam's step on the soft word hardly depends on its gradient's
    scale); the gate term has no noise level and stays as it is."""
    from dataclasses import replace

    network = toy_network(unet, encoder)
    first = {}
    for weighting, net in (("noise", network), ("model", replace(network, train_weights=3 / TRAIN_SIGMAS.square()))):
        _, tokens, adapter, _ = stage1(encoder, unet)
        with adapter.attached(unet):
            result = finetune(adapter, unet, net, tokens, _latents(adapter, unet, tokens),
                              FinetuneConfig(steps=1, attack_steps=1, loss_weighting=weighting))
        first[weighting] = result.history[0]
    # the preserve term's open-gate part has no noise level: compare the denoising terms
    for term in ("erase", "adversarial"):
        assert first["model"][term] == pytest.approx(3 * first["noise"][term], rel=1e-4)
    assert first["model"]["gate"] == pytest.approx(first["noise"]["gate"], rel=1e-4)


def test_model_loss_weighting_without_the_networks_training_weights_is_refused(encoder, unet):
    """A network that does not give its training weights cannot run `loss_weighting="model"`:
    a clear error before any step, and the adapter as it was."""
    _, tokens, adapter, _ = stage1(encoder, unet)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with adapter.attached(unet), pytest.raises(ValueError, match=r'loss_weighting="model" needs the model\'s training weights'):
        finetune(adapter, unet, toy_network(unet, encoder), tokens, _latents(adapter, unet, tokens),
                 FinetuneConfig(steps=4, attack_steps=1, loss_weighting="model"))
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items())


def test_a_restarted_soft_word_is_attacked_afresh_from_the_phrase(encoder, unet, monkeypatch):
    """With `restart_every` the soft word starts again from the phrase at that concept step and is
    attacked for `restart_attack_steps` steps before training goes on; without it, the same run
    draws exactly as before (the option costs nothing when off)."""
    import ace.finetune as finetune_module

    events = []  # ("word", a new soft word's vectors) and ("attack", the batches of one call), in order
    real_soft_word, real_attack = finetune_module.SoftWord, finetune_module._attack

    class Recorded(real_soft_word):
        def __init__(self, network, phrase, cfg):
            super().__init__(network, phrase, cfg)
            events.append(("word", {k: v.detach().clone() for k, v in self.vectors.items()}))

    def counted(adapter, denoise, network, soft, batches):
        batches = list(batches)
        events.append(("attack", batches))
        return real_attack(adapter, denoise, network, soft, batches)

    monkeypatch.setattr(finetune_module, "SoftWord", Recorded)
    monkeypatch.setattr(finetune_module, "_attack", counted)
    adapters = {}
    for every in (0, 5):
        events.clear()
        _, tokens, adapter, _ = stage1(encoder, unet)
        with adapter.attached(unet):
            latents = _latents(adapter, unet, tokens)
            finetune(adapter, unet, toy_network(unet, encoder), tokens, latents,
                     FinetuneConfig(steps=12, attack_steps=2, restart_every=every, restart_attack_steps=7))
        adapters[every] = adapter
        starts = [data for kind, data in events if kind == "word"]
        # the call right after a restarted word is its attack; every other call is a training step's
        restart_calls = {i + 1 for i, (kind, _) in enumerate(events) if kind == "word" and i > 0}
        restarts = [events[i][1] for i in sorted(restart_calls)]
        steps = [data for i, (kind, data) in enumerate(events) if kind == "attack" and i not in restart_calls]
        assert [len(b) for b in steps] == [2] * 12  # 12 steps of 2 inner steps on the step's own batch
        if every:
            # the first word, then fresh ones at concept steps 5 and 10, each from the phrase's embeddings
            assert len(starts) == 3 and all(torch.equal(s[k], starts[0][k]) for s in starts for k in s)
            # each restart: 7 steps, each on fresh examples
            assert [len({b.x_t.sum().item() for b in r}) for r in restarts] == [7, 7]
        else:
            assert len(starts) == 1 and restarts == []
    changed = max((a - b).abs().max().item() for a, b in zip(adapters[0].lora_up, adapters[5].lora_up))
    assert changed > 1e-4  # training on the restarted words moves the edit elsewhere
    # off, the run is the default one, draw for draw
    _, tokens, adapter, _ = stage1(encoder, unet)
    with adapter.attached(unet):
        finetune(adapter, unet, toy_network(unet, encoder), tokens, _latents(adapter, unet, tokens),
                 FinetuneConfig(steps=12, attack_steps=2, restart_attack_steps=99))
    for a, b in zip(adapter.lora_up, adapters[0].lora_up):
        assert torch.equal(a, b)


# --- the whole method, and files --------------------------------------------------------------

def test_erase_runs_all_stages_and_save_load_is_exact(tmp_path):
    encoder = ToyTextEncoder(width=384)  # the width of the toy family's context
    unet = ToyUNet(context=384)
    unet.requires_grad_(False)
    request = parse_request("beagle: snoopy", "a dog", "cat")
    erasure = erase(toy_network(unet, encoder, "ace-toy"), request, ClosedFormConfig(), FinetuneConfig(steps=3))
    assert erasure.info["stage2_seconds"] > 0 and len(erasure.info["history"]) == 3
    path = str(tmp_path / "e.safetensors")
    save_erasure(erasure, path)
    loaded = load_erasure(path)
    assert loaded.family == "ace-toy" and loaded.request == erasure.request
    assert erasure.request.concepts[0].synonyms[0] == "snoopy"  # the user's words first, then the words found
    assert erasure.request.preserve == request.preserve
    assert loaded.adapter.num_gates == 1 and loaded.num_res_blocks == erasure.num_res_blocks
    assert erasure.adapter.gate_scope == loaded.adapter.gate_scope == "prompt"  # MiniLM reads both ways
    for a, b in zip(erasure.adapter.state_dict().values(), loaded.adapter.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.info["final_losses"] == erasure.info["history"][-1]


def test_stage_2_recalibrates_the_change_gates_and_files_keep_them(tmp_path):
    """Stage 2 moves A and B; the change gates come out calibrated on the trained edit, shut on the
    same share of preserve tokens. The file keeps them; a file written without them loads without."""
    from ace.closed_form import calibrate_change_gate, preserve_tokens
    from ace.erasure import request_tokens

    encoder = ToyTextEncoder(width=384)
    unet = ToyUNet(context=384)
    unet.requires_grad_(False)
    network = toy_network(unet, encoder, "ace-toy")
    request = parse_request("beagle: snoopy", "a dog", "cat")
    stage1_only = erase(network, request, ClosedFormConfig(change_quantile=0.9), FinetuneConfig(steps=0))
    erasure = erase(network, request, ClosedFormConfig(change_quantile=0.9), FinetuneConfig(steps=3))
    assert erasure.adapter.change_quantile == 0.9
    assert not torch.allclose(erasure.adapter.change_threshold, stage1_only.adapter.change_threshold)
    _, weights = weights_of(unet)
    recalibrated = copy.deepcopy(erasure.adapter)
    calibrate_change_gate(recalibrated, weights, preserve_tokens(request_tokens(network, erasure.request)), 0.9)
    assert torch.allclose(recalibrated.change_threshold, erasure.adapter.change_threshold)
    path = str(tmp_path / "gated.safetensors")
    save_erasure(erasure, path)
    loaded = load_erasure(path).adapter
    assert torch.equal(loaded.change_threshold, erasure.adapter.change_threshold) and loaded.change_quantile == 0.9
    erasure.adapter.change_quantile = 1.0  # an erasure without change gates
    save_erasure(erasure, path)
    assert not load_erasure(path).adapter.has_change_gate


def test_expansion_finds_the_words_the_network_draws_the_concept_from(unet):
    """'pooch' and 'snoopy' are not in the request, but the stand-in encoder makes them mean
    'beagle' (and the network answers them alike): expansion finds them; it leaves the kept
    concept and words the network answers differently alone; the absolute bound keeps only the
    closest when the kept concepts are far."""
    from ace.expansion import ExpansionConfig, expand

    encoder = ToyTextEncoder(synonyms={"snoopy": "beagle", "pooch": "beagle"})
    network = toy_network(unet, encoder)
    request = parse_request("beagle", "a dog", "cat, tree")
    found = expand(network, request, ExpansionConfig(candidates=12, accept_distance=10.0))  # the ratio alone
    words = [w for w, _ in found.found["beagle"]]
    assert "pooch" in words and "snoopy" in words
    assert "cat" not in words and "tree" not in words
    distances = dict(found.found["beagle"])
    assert distances["pooch"] < found.threshold["beagle"] < found.closest_kept["beagle"][1]
    bounded = expand(network, request, ExpansionConfig(candidates=12))
    assert bounded.threshold["beagle"] == 0.4 < found.threshold["beagle"]
    assert "pooch" in dict(bounded.found["beagle"]) and all(d < 0.4 for _, d in bounded.found["beagle"])
    assert set(dict(bounded.found["beagle"])) < set(words)
    expanded = found.expanded(request)
    assert set(words) <= set(expanded.concepts[0].synonyms)
    wide = toy_network(ToyUNet(context=384), ToyTextEncoder(width=384, synonyms={"pooch": "beagle"}))
    off = erase(wide, request, ClosedFormConfig(), FinetuneConfig(steps=0), ExpansionConfig(enabled=False))
    assert off.request == request and "expansion" not in off.info


@pytest.mark.parametrize("settings, message", [
    ({"candidates": 0}, "candidates must be an integer from 1 to 1000000, got 0"),
    ({"gradient_candidates": -1}, "gradient candidates must be an integer from 0 to 1000000, got -1"),
    ({"gradient_accept_distance": 0}, r"gradient accept distance must be a number in \(0, 10\], got 0"),
    ({"template": "a word"}, "needs {} where the word goes"),
])
def test_expansion_settings_are_checked(settings, message):
    from ace.expansion import ExpansionConfig

    with pytest.raises(ValueError, match=message):
        ExpansionConfig(**settings)
    assert ExpansionConfig(gradient_candidates=0).gradient_candidates == 0  # the gradient's words off


def test_erase_refuses_unsupported_family(encoder, unet):
    with pytest.raises(UnsupportedModelError, match="Flux model; ACE supports Stable Diffusion 1.x"):
        erase(toy_network(unet, encoder, "Flux"), parse_request("beagle"))


def test_erasure_must_fit_the_model(encoder, unet):
    request, _, adapter, info = stage1(encoder, unet)
    erasure = Erasure("sd1", request, adapter, num_res_blocks=1)
    with pytest.raises(ValueError, match="made for a sd1 model and cannot be applied to a sdxl"):
        erasure.check_fits("sdxl", adapter.projections)
    other = cross_attention_projections(ToyUNet(depth=2))
    with pytest.raises(ValueError, match="does not fit this sd1 model"):
        erasure.check_fits("sd1", other)


def test_loading_bad_files_fails_clearly(encoder, unet, tmp_path):
    request, _, adapter, info = stage1(encoder, unet)
    good = str(tmp_path / "good.safetensors")
    save_erasure(Erasure("ace-toy", request, adapter, num_res_blocks=1), good)
    data = open(good, "rb").read()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ErasureFileError, match="corrupted"):
        load_erasure(str(corrupt))
    with pytest.raises(ErasureFileError, match="no erasure file"):
        load_erasure(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ErasureFileError, match="only loads safetensors"):
        load_erasure(str(tmp_path / "model.ckpt"))

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(good, "pt") as f:
        meta = f.metadata()
    tensors = load_file(good)
    lora = tmp_path / "lora.safetensors"
    save_file({"x.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ErasureFileError, match="not an ACE erasure file"):
        load_erasure(str(lora))
    for change, message in (
        (lambda t, m: m.update(format_version="99"), "format version 99"),
        (lambda t, m: m.update(format_version="2"), "earlier version of this pack"),
        (lambda t, m: t.pop("gate.center"), "'gate.center' is missing"),
        (lambda t, m: t.__setitem__("gate.threshold", torch.tensor([math.nan])), "NaN or infinite"),
        (lambda t, m: t.__setitem__("gate.threshold", torch.zeros(3)), "has shape"),
    ):
        t, m = dict(tensors), dict(meta)
        change(t, m)
        bad = str(tmp_path / "bad.safetensors")
        save_file(t, bad, metadata=m)
        with pytest.raises(ErasureFileError, match=message):
            load_erasure(bad)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", "/etc/passwd", "c:\\x", "bad\x00name", ".hidden"])
def test_file_names_with_paths_are_refused(name):
    with pytest.raises(ErasureFileError):
        check_file_name(name)


def test_file_names_get_the_suffix():
    assert check_file_name("no_van_gogh") == "no_van_gogh.safetensors"
    assert check_file_name("x.safetensors") == "x.safetensors"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stage2_trains_a_half_precision_network(encoder, dtype):
    """fp16/bf16 weights: the maths of stage 1 runs in float64, the gate in float32, and the
    adapter's own parameters stay float32 while the network runs in its dtype."""
    net = ToyUNet().to(dtype)
    net.requires_grad_(False)
    _, tokens, adapter, _ = stage1(encoder, net)
    assert adapter.lora_down[0].dtype == torch.float32

    def denoise(x, sigma, context, pooled=None):
        return net(x.to(dtype), sigma.to(dtype), context.to(dtype)).float()

    with adapter.attached(net):
        with adapter.disabled():
            latents = [sample_latents(denoise, c.concept_context[:2], (4, 8, 8), SAMPLE_SIGMAS) for c in tokens.concepts]
        result = finetune(adapter, denoise, toy_network(net, encoder), tokens, latents, FinetuneConfig(steps=3))
    assert all(math.isfinite(v) for h in result.history for v in h.values())
    assert adapter.lora_down[0].dtype == torch.float32 and torch.isfinite(adapter.lora_down[0]).all()
