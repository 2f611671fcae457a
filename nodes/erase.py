"""Nodes that compute and apply an erasure: the one-node "ACE Erase Concept", and the stages
apart for people who want them (concept list, closed form, adversarial fine-tuning, apply)."""
from __future__ import annotations

import dataclasses

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io, ui

from ..ace.adapter import check_strength
from ..ace.closed_form import ClosedFormConfig
from ..ace.concepts import ConceptRequest
from ..ace.erasure import Erasure, erase, fine_tune
from ..ace.expansion import ExpansionConfig
from ..ace.finetune import FinetuneConfig
from ..ace.network import Network, TrainingCompute
from ..ace.presets import NO_PRESET, preset_names, request_with_preset
from .comfy_models import (CHECKPOINTING_CHOICES, PRECISION_CHOICES, network_of, prediction_type, training_compute,
                           with_erasure)
from .loss_plot import loss_curve_image

Erasure_ = io.Custom("ACE_ERASURE")
Concepts_ = io.Custom("ACE_CONCEPTS")

CONCEPTS_TOOLTIP = (
    "One concept to erase per line; synonyms after a colon, separated by commas. "
    "Example: 'Van Gogh: Vincent van Gogh, van gogh style'."
)


def preset_input() -> io.Combo.Input:
    """The concept preset a node starts from (presets/*.json). Optional and last, so that graphs
    saved before it existed load with their values in place and run without a preset."""
    return io.Combo.Input(
        "preset", options=[NO_PRESET, *preset_names()], default=NO_PRESET, optional=True,
        tooltip="A curated concept list to start from (the help page lists them); the concepts, anchor and "
                "preserve boxes add to it. A starting point, not a guarantee: check wordings with ACE Inspect Prompt.")


def _progress_callback(total: int):
    bar = comfy.utils.ProgressBar(total)

    def callback(report) -> None:
        bar.update_absolute(report.step, report.total)
        # Cancel in ComfyUI raises here, between two steps; the half-trained adapter is dropped.
        comfy.model_management.throw_exception_if_processing_interrupted()

    return callback


def _recorded(erasure: Erasure, model, network: Network) -> Erasure:
    """The erasure with what its model predicts (which an exported LoRA's metadata names) and how
    its stage 2 ran (precision, checkpointing) in its record."""
    erasure.info["prediction"] = prediction_type(model)
    if erasure.info.get("history"):
        erasure.info["stage2_compute"] = dataclasses.asdict(network.compute)
    return erasure


def erase_from_model(model, clip, request: ConceptRequest, closed_form: ClosedFormConfig, training: FinetuneConfig,
                     resolution: int | None = None, expansion: ExpansionConfig = ExpansionConfig(),
                     compute: TrainingCompute | None = None) -> Erasure:
    """Stages 0-2 on a ComfyUI MODEL and CLIP (the MODEL itself is never changed). `compute`:
    stage 2's precision and gradient checkpointing (default: the device's, `default_compute`)."""
    callback = _progress_callback(training.steps) if training.steps else None
    network = network_of(model, clip, resolution, compute)
    return _recorded(erase(network, request, closed_form, training, expansion, callback), model, network)


def found_words(erasure: Erasure) -> str:
    """What concept expansion added to each concept, for the node's text and the command line."""
    found = erasure.info.get("expansion", {}).get("found")
    if found is None:
        return "expansion off: only the words of the request are erased"
    lines = [f"{target}: {', '.join(w for w, _ in words) if words else 'no other word found'}"
             for target, words in found.items()]
    return "words the model draws each concept from, erased with it:\n" + "\n".join(lines)


def fine_tune_on_model(model, clip, erasure: Erasure, training: FinetuneConfig, resolution: int | None = None,
                       compute: TrainingCompute | None = None) -> Erasure:
    """Stage 2 of an existing erasure on a ComfyUI MODEL and CLIP (neither is changed)."""
    network = network_of(model, clip, resolution, compute)
    return _recorded(fine_tune(erasure, network, training, _progress_callback(training.steps)), model, network)


class EraseConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_EraseConcept",
            display_name="ACE Erase Concept",
            category="ACE/erase",
            description=(
                "Erase concepts (a style, a person, an object) from the model with ACE: a closed-form "
                "gated edit of every cross-attention key/value, then a short adversarial fine-tuning. "
                "Prompts that name the concept, or its synonyms, render the neutral anchor instead; "
                "other prompts render as before."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to erase concepts from (SD1.x, SD2.x or SDXL). It is not changed; an erased copy comes out."),
                io.Clip.Input("clip", tooltip="The CLIP loaded with this model: it encodes the concepts."),
                io.String.Input("concepts", multiline=True, default="Van Gogh: Vincent van Gogh, van gogh style", tooltip=CONCEPTS_TOOLTIP),
                io.String.Input("anchor", default="", tooltip="What the concepts become, e.g. 'a painting' for an artist or 'a person' for a celebrity. Empty maps them onto nothing."),
                io.String.Input("preserve", multiline=True, default="", tooltip="Concepts that must keep rendering as before (e.g. 'Monet, Rembrandt'), separated by commas or new lines."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, tooltip="How strongly the erasure applies: 0 leaves the model as it was, 1 is the full erasure."),
                io.Int.Input("steps", default=40, min=0, max=1000, tooltip="Adversarial fine-tuning steps after the closed form; 0 uses the closed form only (seconds, no training)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the fine-tuning's noise and attacks; the same seed gives the same erasure."),
                io.Boolean.Input("expand", default=True, optional=True, tooltip="Also erase the other words the model draws each concept from, found in the model itself (shown on the node). Off: only the words you typed."),
                preset_input(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the concepts erased."),
                Erasure_.Output(display_name="ERASURE", tooltip="The erasure itself, to save, export as a LoRA or apply to another model."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concepts, anchor, preserve, strength, steps, seed, expand=True,
                preset=NO_PRESET) -> io.NodeOutput:
        check_strength(strength)
        request = request_with_preset(preset, concepts, anchor, preserve)
        erasure = erase_from_model(model, clip, request, ClosedFormConfig(), FinetuneConfig(steps=steps, seed=seed),
                                   expansion=ExpansionConfig(enabled=expand))
        return io.NodeOutput(with_erasure(model, erasure, strength), erasure, ui=ui.PreviewText(found_words(erasure)))


class ConceptList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_ConceptList",
            display_name="ACE Concept List",
            category="ACE/stages",
            description="The concepts to erase, what they become, and what to keep, checked before any work starts.",
            inputs=[
                io.String.Input("concepts", multiline=True, default="", tooltip=CONCEPTS_TOOLTIP),
                io.String.Input("anchor", default="", tooltip="What the concepts become (e.g. 'a painting'); empty maps them onto nothing."),
                io.String.Input("preserve", multiline=True, default="", tooltip="Concepts that must keep rendering as before, separated by commas or new lines."),
                preset_input(),
            ],
            outputs=[Concepts_.Output(display_name="CONCEPTS", tooltip="The checked concept request.")],
        )

    @classmethod
    def execute(cls, concepts, anchor, preserve, preset=NO_PRESET) -> io.NodeOutput:
        return io.NodeOutput(request_with_preset(preset, concepts, anchor, preserve))


class ClosedFormErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_ClosedForm",
            display_name="ACE Closed-Form Erasure",
            category="ACE/stages",
            description="Stage 1 of ACE: the gated low-rank edit of every cross-attention key/value, solved in closed form (seconds, no training).",
            inputs=[
                io.Model.Input("model", tooltip="The model the erasure is computed for (not changed)."),
                io.Clip.Input("clip", tooltip="The CLIP loaded with this model."),
                Concepts_.Input("concepts", tooltip="From ACE Concept List."),
                io.Int.Input("rank", default=64, min=1, max=256, tooltip="Rank of the edit per concept and layer (the joint edit: rank x concepts, at most 256); higher fits the concept more closely."),
                io.Float.Input("preserve_weight", default=1.0, min=0.0, max=100.0, step=0.01, tooltip="How hard the edit itself avoids changing the preserve concepts and everyday prompts, beside the gates; lower fits the concept more closely and changes near concepts more."),
                io.Boolean.Input("expand", default=True, optional=True, tooltip="Also erase the other words the model draws each concept from, found in the model itself. Off: only the words of the list."),
            ],
            outputs=[Erasure_.Output(display_name="ERASURE", tooltip="The closed-form erasure.")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, rank, preserve_weight, expand=True) -> io.NodeOutput:
        cfg = ClosedFormConfig(rank=rank, preserve_weight=preserve_weight)
        erasure = erase_from_model(model, clip, concepts, cfg, FinetuneConfig(steps=0), expansion=ExpansionConfig(enabled=expand))
        return io.NodeOutput(erasure, ui=ui.PreviewText(found_words(erasure)))


class AdversarialFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_FineTune",
            display_name="ACE Adversarial Fine-Tune",
            category="ACE/stages",
            description=(
                "Stage 2 of ACE: a short fine-tuning of the erasure on examples the original model "
                "generates, with adversarial perturbations of the concept's tokens, so that synonyms "
                "and reworded prompts stay erased. Runs on the model's device (the local GPU if any)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the erasure was computed for (not changed)."),
                io.Clip.Input("clip", tooltip="The CLIP loaded with this model."),
                Erasure_.Input("erasure", tooltip="A closed-form (or already fine-tuned) erasure of this model."),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Training steps per concept (the run takes steps x concepts, at most 400)."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, tooltip="Adam learning rate of the adapter (warm-up, then a cosine decay)."),
                io.Float.Input("adversarial_weight", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Weight of the loss under attack (a learned soft word in place of the concept); 0 trains without attacks."),
                io.Float.Input("preserve_weight", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Weight of the loss that keeps other prompts unchanged, with the gate shut and open."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="How far the concept's prediction is pushed away from it, past the neutral one (negative guidance, as ESD's)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Image size of the training examples (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the noise and attacks; the same seed gives the same result."),
                io.Combo.Input("precision", options=list(PRECISION_CHOICES), default="auto", optional=True, tooltip="The network's precision while training: auto = bf16 autocast on a GPU that has it (fp16 on older GPUs), fp32 on the CPU; fp32 = the dtype the model was loaded in, no autocast. Half precision halves the memory of the activations."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING_CHOICES), default="auto", optional=True, tooltip="Recompute the UNet's activations in the backward pass instead of keeping them: far less memory, for one more forward pass of each block per backward pass. auto = on for SDXL on a GPU, off otherwise."),
            ],
            outputs=[
                Erasure_.Output(display_name="ERASURE", tooltip="The fine-tuned erasure."),
                io.Image.Output(display_name="LOSS_CURVE", tooltip="The training losses per step, as an image."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, erasure, steps, learning_rate, adversarial_weight, preserve_weight, guidance, resolution, seed,
                precision="auto", gradient_checkpointing="auto") -> io.NodeOutput:
        cfg = FinetuneConfig(steps=steps, learning_rate=learning_rate, adversarial_weight=adversarial_weight,
                             preserve_weight=preserve_weight, guidance=guidance, seed=seed)
        compute = training_compute(model, precision, gradient_checkpointing)
        tuned = fine_tune_on_model(model, clip, erasure, cfg, resolution, compute)
        curve = loss_curve_image(tuned.info["history"])
        return io.NodeOutput(tuned, curve, ui=ui.PreviewImage(curve, cls=cls))


class ApplyErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_Apply",
            display_name="ACE Apply Erasure",
            category="ACE/erase",
            description=(
                "Apply an erasure to a model at a strength: the model it was made from, the same model "
                "after other LoRAs, or another fine-tune of the same base model."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the erasure to (not changed; an erased copy comes out)."),
                Erasure_.Input("erasure", tooltip="An erasure for this model family and architecture."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05, tooltip="1 is the full erasure, 0 none."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the erasure applied.")],
        )

    @classmethod
    def execute(cls, model, erasure, strength) -> io.NodeOutput:
        check_strength(strength)
        return io.NodeOutput(with_erasure(model, erasure, strength))


ERASE_NODES = [EraseConcept, ConceptList, ClosedFormErasure, AdversarialFineTune, ApplyErasure]
