"""Small plain-torch stand-ins for a text encoder and a cross-attention UNet.

They let `ace/` be tested in milliseconds without ComfyUI. The encoder is causal like CLIP: each
token's embedding mixes in the words before it, so a concept leaks into every later position.
The network names its projections `...attn2.to_k` / `...attn2.to_v` like ComfyUI's UNets.
"""
from __future__ import annotations

import hashlib
import re

import torch

from ace.families import cross_attention_projections
from ace.network import Network

SAMPLE_SIGMAS = torch.tensor([10.0, 5.0, 2.5, 1.2, 0.6, 0.3, 0.0])
# The stand-in encoder's whole words, for concept expansion.
VOCABULARY = ("dog", "cat", "tree", "horse", "house", "car", "river", "painting", "photo", "bird", "flower", "table")
TRAIN_SIGMAS = SAMPLE_SIGMAS[1:-1]


def _word_vector(word: str, width: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


class ToyTextEncoder:
    start_tokens = 1

    def __init__(self, width: int = 64, length: int = 16, synonyms: dict[str, str] | None = None):
        self.width, self.length = width, length
        # synonym -> word it means; the synonym's vector is mostly the word's vector
        self.synonyms = synonyms or {}
        self.bos = _word_vector("<bos>", width) * 3
        self.eos = _word_vector("<eos>", width)

    def words(self, text: str) -> list[str]:
        return re.findall(r"[\w']+|[^\w\s]", text.lower())

    def count_tokens(self, text: str) -> int:
        return len(self.words(text))

    def vocabulary(self) -> list[str]:
        return sorted({*VOCABULARY, *self.synonyms, *self.synonyms.values()})

    def static_embeddings(self, words) -> torch.Tensor:
        return torch.stack([torch.stack([self._vector(t) for t in self.words(w)]).mean(0) for w in words])

    def encode_words(self, words) -> torch.Tensor:
        return torch.stack([self.encode([w])[0, self.count_tokens(w)] for w in words])

    def _vector(self, word: str) -> torch.Tensor:
        if word in self.synonyms:
            return 0.8 * _word_vector(self.synonyms[word], self.width) + 0.6 * _word_vector(word, self.width)
        return _word_vector(word, self.width)

    def encode(self, prompts) -> torch.Tensor:
        return self._contextualise([[self._vector(w) for w in self.words(p)] for p in prompts])

    def encode_pooled(self, prompts) -> tuple[torch.Tensor, None]:
        return self.encode(prompts), None

    def _contextualise(self, sentences: list[list[torch.Tensor]]) -> torch.Tensor:
        """Word vectors -> token embeddings: BOS, the words, EOS padding; each position mixes in the
        running mean of the positions before it (causal, like CLIP)."""
        rows = []
        for words in sentences:
            vectors = [self.bos] + words[: self.length - 2]
            vectors += [self.eos] * (self.length - len(vectors))
            running, row = torch.zeros(self.width), []
            for t, v in enumerate(vectors):
                row.append(v + 0.5 * running / max(t, 1))
                running = running + v
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def soft_word(self, phrase: str) -> dict[str, torch.Tensor]:
        return {"words": torch.stack([self._vector(w) for w in self.words(phrase)])}

    def encode_soft(self, prompts, phrase: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        wanted, sentences = self.words(phrase), []
        for prompt in prompts:
            words, n = self.words(prompt), len(wanted)
            at = next(i for i in range(len(words) - n + 1) if words[i:i + n] == wanted)
            sentences.append([self._vector(w) for w in words[:at]] + list(vectors["words"])
                             + [self._vector(w) for w in words[at + n:]])
        return self._contextualise(sentences)


class ToyCrossAttention(torch.nn.Module):
    def __init__(self, channels: int, context: int, inner: int):
        super().__init__()
        self.to_q = torch.nn.Linear(channels, inner, bias=False)
        self.to_k = torch.nn.Linear(context, inner, bias=False)
        self.to_v = torch.nn.Linear(context, inner, bias=False)
        self.to_out = torch.nn.Linear(inner, channels)

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        return self.to_out(attn @ v)


class ToyBlock(torch.nn.Module):
    def __init__(self, channels, context, inner):
        super().__init__()
        self.attn2 = ToyCrossAttention(channels, context, inner)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(channels, channels * 2), torch.nn.GELU(), torch.nn.Linear(channels * 2, channels))

    def forward(self, h, context):
        h = h + self.attn2(h, context)
        return h + self.mlp(h)


class ToyUNet(torch.nn.Module):
    """A denoiser D(x, sigma, context, pooled) -> x0 estimate on [B, C, H, W] images (it takes no
    pooled text: `pooled` is always None)."""

    def __init__(self, context: int = 64, channels: int = 32, in_channels: int = 4, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = torch.nn.Conv2d(in_channels + 1, channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList(ToyBlock(channels, context, channels + 16 * i) for i in range(depth))
        self.proj_out = torch.nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x, sigma, context, pooled=None):
        b, _, h, w = x.shape
        level = torch.log(sigma).view(-1, 1, 1, 1).expand(b, 1, h, w)
        t = self.proj_in(torch.cat([x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), level], 1))
        tokens = t.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, context)
        return x - sigma.view(-1, 1, 1, 1) * self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))


def toy_network(unet: ToyUNet, encoder: ToyTextEncoder, family: str = "ace-toy") -> Network:
    """The stand-ins as ACE's `Network` (as `nodes/comfy_models.network_of` builds it in ComfyUI)."""
    projections = cross_attention_projections(unet)
    modules = dict(unet.named_modules())

    def attach(edit):
        return edit.attached(unet)  # yields the network, a denoiser D(x, sigma, context) already

    return Network(family, projections, {p.name: modules[p.name].weight for p in projections}, encoder, attach,
                   latent_shape=(4, 8, 8), sample_sigmas=SAMPLE_SIGMAS, train_sigmas=TRAIN_SIGMAS, num_res_blocks=1)
