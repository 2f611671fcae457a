"""Stage 0, second half: the concept as the model knows it, not only the words the request names.

A request names one or two words for a concept; the model draws it from many more ("disc", "orb"
and "sphere" for a circle). Those words are found in the model itself, never in a list:

1. Candidates: the `scan` whole words of the text encoder's vocabulary nearest the concept by
   their input token embeddings (free: no forward pass), each then encoded alone
   (`TextEncoder.encode_words`) and ranked by how close its keys and values are to the concept's
   in the cross-attention layers (the mean cosine over every key/value projection of the
   network). The value space is where the model reads the text, so words it treats alike sit
   together there even when the text encoder's own geometry puts them apart; the first cut keeps
   the forward passes affordable (a CLIP encodes a whole 77-token window per word). More
   candidates come from the model's response rather than the word's neighbourhood: the scanned
   words furthest along the gradient, with respect to the word's context row, of the denoiser's
   prediction projected on the concept's own response (`response_gradient`). A request word can
   sit far from the concept's other words in value space ("navy" sits among naval words, not near
   "blue") while the model draws the same thing from both; one backward pass per noise level finds
   those words.
2. The network decides: for each candidate, the denoiser's response to "a {word}" (its prediction
   minus its prediction for the neutral prompt, at a few noise levels and noise draws) is compared
   with its response to the concept. A word is the concept when its response is closer to the
   concept's than `accept_ratio` times the closest of the concepts the request keeps (calibrated on
   the model itself: a kept concept is by definition not the erased one), and never farther than
   `accept_distance` (`gradient_accept_distance` for a word only the gradient brought: it was
   chosen for answering like the concept, so it passes more easily). The bound matters when every kept concept is far from the erased one: on
   the causal toy, erasing "circle" while keeping three coloured shapes put the closest kept
   concept at 1.76, and the ratio alone accepted "shapes" (0.47) and, for the made-up name
   "Vexmoor", ten unrelated words (0.75-0.85), while the concept's real other words sit below
   0.25 ("circles" 0.07, "disc" 0.10, "orb" 0.14, "sphere" 0.20).

Found words join the concept as synonyms: stage 0 collects their tokens, the joint edit maps them
onto the anchor and the concept's gate opens on them; they also leave the everyday preserve pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .adapter import ProjectionEdit
from .concepts import MAX_SYNONYMS, Concept, ConceptRequest, make_request
from .network import Network


@dataclass(frozen=True)
class ExpansionConfig:
    enabled: bool = True
    scan: int | None = None  # vocabulary words nearest each concept by input embedding that are encoded
    # (None: what the encoder can afford, its `scan_budget`, else 4096)
    candidates: int = 48  # of those, the words nearest in value space that the network is asked about
    gradient_candidates: int = 48  # and the words furthest along the concept's response gradient (0: none)
    max_words: int = 12  # found words added to a concept at most (the closest responses first)
    accept_ratio: float = 0.75  # of the response distance of the closest kept concept
    accept_distance: float = 0.4  # relative response distance a word is never accepted beyond
    gradient_accept_distance: float = 0.2  # the same for a word only the response gradient brought
    noise_draws: int = 8  # noise samples per noise level in the response test
    template: str = "a {}"

    def __post_init__(self):
        for name in ("scan", "candidates", "max_words", "noise_draws"):
            v = getattr(self, name)
            if v is None and name == "scan":
                continue
            if not (isinstance(v, int) and 1 <= v <= 1_000_000):
                raise ValueError(f"{name.replace('_', ' ')} must be an integer from 1 to 1000000, got {v!r}")
        for name in ("accept_ratio", "accept_distance", "gradient_accept_distance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 10):
                raise ValueError(f"{name.replace('_', ' ')} must be a number in (0, 10], got {v!r}")
        if not (isinstance(self.gradient_candidates, int) and 0 <= self.gradient_candidates <= 1_000_000):
            raise ValueError(f"gradient candidates must be an integer from 0 to 1000000, got {self.gradient_candidates!r}")
        if "{}" not in self.template:
            raise ValueError("the expansion template needs {} where the word goes")


@dataclass
class Expansion:
    """What expansion found: per concept target, the accepted words with their response distance,
    the threshold used and the closest kept concept, and the time each part took."""

    found: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    threshold: dict[str, float] = field(default_factory=dict)
    closest_kept: dict[str, tuple[str, float] | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def expanded(self, request: ConceptRequest) -> ConceptRequest:
        """The request with every found word added to its concept's synonyms."""
        concepts = [Concept(c.target, (*c.synonyms, *(w for w, _ in self.found.get(c.target, ())))[:MAX_SYNONYMS],
                            c.anchor) for c in request.concepts]
        return make_request(concepts, request.preserve)

    def to_json(self) -> dict:
        return {"found": {k: [[w, round(d, 4)] for w, d in v] for k, v in self.found.items()},
                "threshold": {k: round(v, 4) for k, v in self.threshold.items()},
                "closest_kept": {k: (list(v) if v else None) for k, v in self.closest_kept.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def value_similarity(embeddings: torch.Tensor, reference: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine, over every projection W, of W e and W r: `embeddings` [n, d], `reference` [d]."""
    total = torch.zeros(len(embeddings))
    for W in weights:
        W = W.float()
        total += torch.nn.functional.cosine_similarity(embeddings.float() @ W.T, (reference.float() @ W.T)[None], dim=1)
    return total / len(weights)


def noisy_inputs(sigmas: torch.Tensor, latent_shape: tuple, draws: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The response test's noisy latents and their noise levels: `draws` pictures of pure noise at
    each σ, from a fixed seed so that every word is asked about the same pictures."""
    generator = torch.Generator().manual_seed(0)
    return [((torch.randn((draws, *latent_shape), generator=generator) * sigma).to(device),
             torch.full((draws,), sigma, device=device)) for sigma in sigmas.tolist()]


def _per_draw(contexts: torch.Tensor, pooled: torch.Tensor | None, i: int, draws: int, device):
    """Prompt i's context and pooled text (None if the model takes none), once per noise draw."""
    text = None if pooled is None else pooled[i:i + 1].to(device).expand(draws, -1)
    return contexts[i:i + 1].to(device).expand(draws, -1, -1), text


def responses(denoise, encoder, prompts: list[str], neutral: str, sigmas: torch.Tensor, latent_shape: tuple,
              draws: int, device) -> torch.Tensor:
    """Each prompt's denoiser response, D(x, σ, prompt) − D(x, σ, neutral), at every σ and noise
    draw, flattened: [len(prompts), …]."""
    contexts, pooled = encoder.encode_pooled([*prompts, neutral])
    contexts = contexts.to(device)

    out = []
    with torch.no_grad():
        for x, s in noisy_inputs(sigmas, latent_shape, draws, device):
            reference = denoise(x, s, *_per_draw(contexts, pooled, len(prompts), draws, device))
            rows = [(denoise(x, s, *_per_draw(contexts, pooled, i, draws, device)) - reference).flatten().cpu()
                    for i in range(len(prompts))]
            out.append(torch.stack(rows))
    return torch.cat(out, dim=1)


def response_gradient(denoise, encoder, prompt: str, position: int, neutral: str, sigmas: torch.Tensor,
                      latent_shape: tuple, draws: int, device) -> torch.Tensor:
    """The direction `[d]` in which moving the context row at `position` of `prompt` moves the
    denoiser's prediction along the prompt's own response (its prediction minus the neutral
    prompt's): the gradient of Σ ⟨D(x, σ, context), response⟩ over the `noisy_inputs`, with the
    response held fixed. A word whose context row lies further along it than the prompt's word
    makes the model draw more of what the prompt draws (to first order)."""
    contexts, pooled = encoder.encode_pooled([prompt, neutral])
    (context, text), (neutral_context, neutral_text) = (_per_draw(contexts, pooled, i, draws, device) for i in (0, 1))
    per_level = []  # summed after the loop: ComfyUI's executor runs nodes in inference mode, where a
    # tensor made outside the block below could not be updated in place inside it
    with torch.inference_mode(False), torch.enable_grad():
        for x, s in noisy_inputs(sigmas, latent_shape, draws, device):
            with torch.no_grad():
                response = denoise(x, s, context, text) - denoise(x, s, neutral_context, neutral_text)
            rows = context.clone().requires_grad_(True)
            (denoise(x, s, rows, text).float() * response.float()).sum().backward()
            per_level.append(rows.grad[:, position].sum(0).float().cpu())
    return torch.stack(per_level).sum(0)


def expand(network: Network, request: ConceptRequest, cfg: ExpansionConfig = ExpansionConfig()) -> Expansion:
    """Find each concept's other words in the model (see the module's docstring)."""
    result = Expansion()
    encoder = network.encoder
    started = time.perf_counter()
    vocabulary = encoder.vocabulary()
    scan = cfg.scan or getattr(encoder, "scan_budget", 4096)
    static = torch.nn.functional.normalize(encoder.static_embeddings(vocabulary), dim=1)
    scanned: dict[str, list[str]] = {}
    for concept in request.concepts:
        reference = torch.nn.functional.normalize(encoder.static_embeddings([concept.target]), dim=1)[0]
        nearest = (static @ reference).topk(min(scan, len(vocabulary))).indices.tolist()
        scanned[concept.target] = [vocabulary[i] for i in nearest]
    encoder.encode_words(sorted({w for words in scanned.values() for w in words}))  # one batch, cached
    result.seconds["scan"] = time.perf_counter() - started
    weights = list(network.weights.values())
    taken = {p.lower() for c in request.concepts for p in c.phrases} | {p.lower() for p in request.preserve}
    # Two noise levels in the upper-middle of the model's schedule, where the prediction still
    # depends on what the prompt asks for and not yet on fine detail.
    sigmas = network.sample_sigmas[2:4]
    started, gradient_seconds = time.perf_counter(), 0.0
    with network.attach(ProjectionEdit([])) as denoise:
        for concept in request.concepts:
            words = scanned[concept.target]
            reference = encoder.encode_words([concept.target])[0]
            embeddings = encoder.encode_words(words)
            similarity = value_similarity(embeddings, reference, weights)
            order = similarity.argsort(descending=True).tolist()
            candidates = [words[i] for i in order if words[i].lower() not in taken][: cfg.candidates]
            by_value = len(candidates)
            neutral = cfg.template.format(concept.anchor).strip()
            if cfg.gradient_candidates:
                # and the words that move the prediction furthest along the concept's own response: a
                # word of the same meaning need not sit near the request word ("navy" -> "blue")
                prompt = cfg.template.format(concept.target)
                position = encoder.start_tokens + encoder.count_tokens(prompt) - 1
                gradient_started = time.perf_counter()
                along = (embeddings - reference) @ response_gradient(
                    denoise, encoder, prompt, position, neutral, sigmas, network.latent_shape, cfg.noise_draws,
                    network.device)
                gradient_seconds += time.perf_counter() - gradient_started
                by_response = [words[i] for i in along.argsort(descending=True).tolist()
                               if words[i].lower() not in taken and words[i] not in candidates]
                candidates += by_response[: cfg.gradient_candidates]
            kept = list(request.preserve)
            prompts = [cfg.template.format(w) for w in (concept.target, *candidates, *kept)]
            r = responses(denoise, encoder, prompts, neutral, sigmas, network.latent_shape, cfg.noise_draws,
                          network.device)
            distance = ((r - r[0]).norm(dim=1) / r[0].norm().clamp_min(1e-12)).tolist()
            kept_distance = list(zip(kept, distance[1 + len(candidates):]))
            closest = min(kept_distance, key=lambda x: x[1]) if kept_distance else None
            threshold = min(cfg.accept_ratio * closest[1], cfg.accept_distance) if closest else cfg.accept_distance
            # A word picked by the response gradient was picked for moving the prediction the way
            # the concept does, so it passes the response test more easily than a neighbour in
            # value space: it must come closer (causal toy, 10 concepts at the value bound of 0.4:
            # "tsunami" 0.29 for triangle, "witches" 0.30 for red, "wolverine" 0.39 for blue).
            bounds = [threshold] * by_value + [min(threshold, cfg.gradient_accept_distance)] * (len(candidates) - by_value)
            accepted = sorted((d, w) for w, d, bound in zip(candidates, distance[1:1 + len(candidates)], bounds)
                              if d < bound)
            result.found[concept.target] = [(w, d) for d, w in accepted[: cfg.max_words]]
            taken |= {w.lower() for w, _ in result.found[concept.target]}
            result.threshold[concept.target] = threshold
            result.closest_kept[concept.target] = closest
    result.seconds["gradient"] = gradient_seconds
    result.seconds["response"] = time.perf_counter() - started - gradient_seconds
    return result
