"""The gated adapter: ACE's edit of every cross-attention key/value projection.

For a projection `W` and a text token embedding `e`, the edited layer computes

    W e + strength · g(e) · B A e,        g(e) = max_c g_c(e)

with one low-rank pair `(A, B)` per projection, solved for all the request's concepts together
(stage 1), and one gate per concept shared by all layers. The gate of concept `c`,
`g_c(e) = sigmoid((s_c(e) − τ_c) / T_c)`, looks at `s_c(e)`, the log of the mean squared coordinate
of the centred embedding along the concept's directions `U_c` (directions where concept tokens
vary far more than preserve tokens, scaled to unit preserve variance), so it fires on
concept-like tokens and stays shut on everything else. The largest gate decides how much of the
edit a token gets ("routing"): two concepts whose gates both fire on a token never add their edits
up, and a token no gate opens on goes through the original weights. Along a prompt `[B, L, d]`
the gate reaches as far as the text encoder carries the concept (`families.GATE_SCOPES`): with
`"causal"` (CLIP) every token after an open gate keeps at least that gate, since it has read the
concept; with `"prompt"` (encoders that read both ways) every position uses the prompt's largest
gate.

An erasure made with `ClosedFormConfig.change_quantile` below 1 also has a change gate per
projection, opened by how far the open edit would move the token's output relative to it
(`change_gate`); the edit then gets the larger of it and the routed gate, so an attacker who shuts
the concept gates must also make the edit itself small on the word.

An erasure made with `ClosedFormConfig.outlier_quantile` below 1 also has an outlier gate, shared
by all layers, opened by how far a token lies from every token the erasure keeps (the preserve pool
and the kept concepts), counted in the pool's whitened coordinates (`outlier_gate`). The edit gets
the larger of it and the other gates, so an attacker who shuts the concept gates must also keep
the word among the kind of tokens real prompts make.

The adapter is plain torch. Like every `ProjectionEdit` (the benchmark's ESD-x weight deltas are
another), it attaches to a network by replacing the `forward` of each projection module
(`patched_forwards`), which is exactly what a ComfyUI object patch does, so weight patches such as
LoRAs on the same layers keep working underneath it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from einops import einsum

from .families import Projection


# How far a token's gate reaches along a prompt: only its own token; that token and every later
# one (a causal encoder: a token carries the words before it); the whole prompt (an encoder that
# reads both ways).
GATE_SCOPE_NAMES = ("token", "causal", "prompt")
# The change gate's temperature, in log relative change: it goes from 0.5 at the threshold to 0.95 at
# about twice the threshold's relative change.
CHANGE_TEMPERATURE = 0.25
# The outlier gate's temperature, in log mean squared whitened coordinate: from 0.05 at its
# calibration quantile to 0.95 about 1.2 further (3.3 times the mean squared coordinate).
OUTLIER_TEMPERATURE = 0.2


@dataclass(frozen=True)
class OutlierGate:
    """What an outlier gate is made of: the pool's centre, a whitener `[d, d]` (columns: directions
    scaled to unit pool variance), the score threshold and the quantile it was calibrated at."""

    center: torch.Tensor
    whitener: torch.Tensor
    threshold: float
    quantile: float

    def score(self, e: torch.Tensor) -> torch.Tensor:
        """Each token's mean squared whitened coordinate, as a log (`gate_score`): `[..., d]` -> `[...]`."""
        return gate_score(e.float() - self.center, self.whitener)

    def values(self, e: torch.Tensor) -> torch.Tensor:
        """The gate `[..., d]` -> `[...]`: open where the score is far above the kept tokens'
        (`closed_form.calibrate_outlier_gate`)."""
        return torch.sigmoid((self.score(e) - self.threshold) / OUTLIER_TEMPERATURE)


def check_strength(strength: float) -> float:
    """An erasure's strength must be a finite number (0 = no edit, 1 = the full edit)."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength)):
        raise ValueError(f"Strength must be a number, got {strength}.")
    return float(strength)


class ProjectionEdit(torch.nn.Module):
    """An additive edit of the output of each cross-attention key/value projection, with an off
    switch. Subclasses say what is added (`delta`); attaching is the same for all of them."""

    def __init__(self, projections: list[Projection]):
        super().__init__()
        self.projections = list(projections)
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled

    def delta(self, index: int, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """What is added to projection `index`'s output `base` for input tokens `x` `[..., d]`."""
        raise NotImplementedError

    def weight_delta(self, index: int) -> torch.Tensor:
        """The edit of projection `index` as a change of its weight (`d_out × d`), where it is
        linear in the input (what baking writes into the weights)."""
        raise NotImplementedError

    def patched_forwards(self, modules: dict[str, torch.nn.Module], prefix: str = "", existing: dict | None = None) -> dict:
        """`{prefix + name + ".forward": callable}` for every projection: ComfyUI object patches.

        A forward already in `existing` (another edit applied earlier in the graph) is kept
        underneath, so edits chained one after the other add up."""
        existing = existing or {}
        patches = {}
        for i, p in enumerate(self.projections):
            key = f"{prefix}{p.name}.forward"
            patches[key] = PatchedForward(self, i, modules[p.name], existing.get(key))
        return patches

    @contextlib.contextmanager
    def attached(self, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Attach to a plain torch UNet for the duration of the block (restored after); yields it."""
        modules = dict(unet.named_modules())
        missing = [p.name for p in self.projections if p.name not in modules]
        if missing:
            raise ValueError(f"this network has no layer {missing[0]}; the erasure is for another model")
        patches = self.patched_forwards(modules)
        for name, forward in patches.items():
            setattr(modules[name.removesuffix(".forward")], "forward", forward)
        try:
            yield unet
        finally:
            for name in patches:
                module = modules[name.removesuffix(".forward")]
                if "forward" in module.__dict__:
                    del module.forward

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The original network's prediction, from the same network: switch the edit off."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


class PatchedForward:
    """Replacement `forward` of one projection: the forward underneath (`inner`, another patch, or
    the layer's own) plus the edit. A plain callable, not a Module, so that setting it on the
    projection does not register it as a sub-module."""

    def __init__(self, edit: ProjectionEdit, index: int, module: torch.nn.Module, inner=None):
        self.edit, self.index, self.module, self.inner = edit, index, module, inner

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.inner is not None:
            base = self.inner(x, *args, **kwargs)
        else:
            base = type(self.module).forward(self.module, x, *args, **kwargs)
        if not self.edit.active:
            return base
        return base + self.edit.delta(self.index, x, base).to(base.dtype)


class GatedAdapter(ProjectionEdit):
    def __init__(
        self,
        projections: list[Projection],
        gate_basis: torch.Tensor,  # [K, d, k_g] gate directions per concept
        gate_center: torch.Tensor,  # [K, d]
        gate_threshold: torch.Tensor,  # [K]
        gate_log_temperature: torch.Tensor,  # [K]
        lora_down: list[torch.Tensor],  # per projection [r, d]   (A)
        lora_up: list[torch.Tensor],  # per projection [d_out, r]  (B)
        gate_scope: str = "token",  # or "causal" or "prompt": see families.GATE_SCOPES
        change_threshold: torch.Tensor | None = None,  # [projections] log relative change; None: no change gate
        change_quantile: float = 1.0,  # the share of preserve tokens the change gates are calibrated shut on
        outlier: OutlierGate | None = None,
    ):
        super().__init__(projections)
        if gate_scope not in GATE_SCOPE_NAMES:
            raise ValueError(f"gate scope must be one of {', '.join(GATE_SCOPE_NAMES)}, got {gate_scope!r}")
        self.gate_scope = gate_scope
        self.gate_basis = torch.nn.Parameter(gate_basis.float())
        self.register_buffer("gate_center", gate_center.float())
        self.gate_threshold = torch.nn.Parameter(gate_threshold.float())
        self.gate_log_temperature = torch.nn.Parameter(gate_log_temperature.float())
        self.lora_down = torch.nn.ParameterList([torch.nn.Parameter(a.float()) for a in lora_down])
        self.lora_up = torch.nn.ParameterList([torch.nn.Parameter(b.float()) for b in lora_up])
        self.register_buffer("change_threshold", torch.full((len(self.projections),), math.inf)
                             if change_threshold is None else change_threshold.float())
        self.change_quantile = change_quantile
        self.register_buffer("outlier_center", None if outlier is None else outlier.center.float())
        self.register_buffer("outlier_whitener", None if outlier is None else outlier.whitener.float())
        self.outlier_threshold = math.inf if outlier is None else outlier.threshold
        self.outlier_quantile = 1.0 if outlier is None else outlier.quantile
        self.strength = 1.0
        self._cast_cache: dict = {}

    @property
    def active(self) -> bool:
        return self.enabled and self.strength != 0

    @property
    def num_gates(self) -> int:
        """One gate per concept of the request."""
        return self.gate_threshold.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_down[0].shape[0]

    def _like(self, t: torch.Tensor, x: torch.Tensor, dtype=None) -> torch.Tensor:
        """`t` on x's device (and in `dtype` or x's dtype), cached while `t` does not change."""
        like = self._cast(t, x, dtype or x.dtype)
        if like.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            # made in ComfyUI's inference mode (an erasure applied upstream of a node that
            # differentiates through the model): autograd cannot save it, a copy it can
            return like.clone()
        return like

    def _cast(self, t: torch.Tensor, x: torch.Tensor, dtype) -> torch.Tensor:
        if t.device == x.device and t.dtype == dtype:
            return t
        if t.requires_grad and torch.is_grad_enabled():
            return t.to(x.device, dtype)
        key = (id(t), x.device, dtype)
        hit = self._cast_cache.get(key)
        if hit is None or hit[0] != t._version:
            hit = (t._version, t.detach().to(x.device, dtype))
            self._cast_cache[key] = hit
        return hit[1]

    def gate(self, e: torch.Tensor) -> torch.Tensor:
        """Gate of every concept for every token: `[..., d]` -> `[..., K]`, in float32."""
        e = e.float()
        centered = e.unsqueeze(-2) - self._like(self.gate_center, e)  # [..., K, d]
        inside = einsum(centered, self._like(self.gate_basis, e), "... k d, k d g -> ... k g")
        s = inside.square().mean(-1).clamp_min(1e-12).log()
        threshold = self._like(self.gate_threshold, e)
        temperature = self._like(self.gate_log_temperature, e).exp()
        return torch.sigmoid((s - threshold) / temperature)

    def spread(self, g: torch.Tensor) -> torch.Tensor:
        """Gates of a prompt's tokens `[..., L, K]` as the gate scope spreads them: per token
        ("token"), the largest at or before the token ("causal": a token of a causal encoder
        carries every word before it), the prompt's largest ("prompt")."""
        if self.gate_scope == "prompt":
            return g.amax(dim=-2, keepdim=True).expand_as(g)
        if self.gate_scope == "causal":
            return torch.cummax(g, dim=-2).values
        return g

    def routed_gate(self, x: torch.Tensor) -> torch.Tensor:
        """How much of the edit each token gets, `[..., d]` -> `[..., 1]`: the largest of the
        concepts' gates, spread over the prompt when `x` holds prompts `[B, L, d]` (the concept
        that fires hardest decides)."""
        g = self.gate(x)
        if self.has_outlier_gate:
            g = torch.cat([g, self.outlier_gate(x)], dim=-1)
        if x.dim() >= 3:
            g = self.spread(g)
        return g.amax(dim=-1, keepdim=True)

    @property
    def has_outlier_gate(self) -> bool:
        return self.outlier_whitener is not None

    def outlier_gate(self, e: torch.Tensor) -> torch.Tensor:
        """The outlier gate for every token `[..., d]` -> `[..., 1]`, in float32
        (`OutlierGate.values`)."""
        e = e.float()
        gate = OutlierGate(self._like(self.outlier_center, e), self._like(self.outlier_whitener, e),
                           self.outlier_threshold, self.outlier_quantile)
        return gate.values(e).unsqueeze(-1)

    @property
    def has_change_gate(self) -> bool:
        # A Python float, not the thresholds: this is asked at every projection of every forward,
        # and reading a tensor on the GPU there would stall it.
        return self.change_quantile < 1

    def change_gate(self, index: int, edit: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Projection `index`'s change gate `[..., 1]`: open where the open edit would move a token's
        output by a large part of it, log(|B A x|² / |W x|²) above the threshold calibrated on
        preserve tokens (`closed_form.calibrate_change_gate`); spread along a prompt as the gates are.
        An attacker who shuts it must make the edit itself small on the token."""
        change = log_relative_change(edit, base).unsqueeze(-1)
        g = torch.sigmoid((change - self.change_threshold[index].to(change.device)) / CHANGE_TEMPERATURE)
        return self.spread(g) if edit.dim() >= 3 else g

    def delta(self, index: int, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The edit added to projection `index`'s output `base` for input tokens `x` `[..., d]`:
        the open edit times the larger of the concept gates and, given `base`, the change gate."""
        A = self._like(self.lora_down[index], x)
        B = self._like(self.lora_up[index], x)
        down = x @ A.T
        g = self.routed_gate(x)
        if base is not None and self.has_change_gate:
            g = torch.maximum(g, self.change_gate(index, down @ B.T, base))
        return (down * (g.to(x.dtype) * self.strength)) @ B.T

    def weight_delta(self, index: int) -> torch.Tensor:
        """strength · B A: the edit with every gate open, as a weight change (float32)."""
        return self.strength * (self.lora_up[index].detach().float() @ self.lora_down[index].detach().float())


def log_relative_change(edit: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """log(|edit|² / |base|²) per token `[...]`: how far an edit moves each output, relative to it."""
    ratio = edit.float().square().sum(-1) / base.float().square().sum(-1).clamp_min(1e-12)
    return ratio.clamp_min(1e-12).log()


def gate_score(centered: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """log of the mean squared coordinate of centred embeddings `[n, d]` along `directions` `[d, k]`.

    The same score `GatedAdapter.gate` computes, for calibrating it."""
    return (centered @ directions).square().mean(-1).clamp_min(1e-12).log()


def open_edit_change(adapter: GatedAdapter, weights: list[torch.Tensor],
                     start_edit: list[tuple[torch.Tensor, torch.Tensor]] | None, P: torch.Tensor,
                     from_start: torch.Tensor | None = None) -> torch.Tensor:
    """How far the open-gate edit moves the preserve tokens' keys and values, relative to them:
    from where the edit started (`start_edit`, each layer's A and B) on the rows `from_start`
    marks (all, given None), from no edit on the others and everywhere given no `start_edit`."""
    moved = kept = 0
    for i, (A, B, W) in enumerate(zip(adapter.lora_down, adapter.lora_up, weights)):
        change = (P @ A.T) @ B.T
        if start_edit is not None:
            A0, B0 = start_edit[i]
            start = (P @ A0.T) @ B0.T
            change = change - (start if from_start is None else start * from_start[:, None])
        moved = moved + change.square().sum()
        kept = kept + (P @ W.T).square().sum().detach()
    return moved / kept.clamp_min(1e-12)
