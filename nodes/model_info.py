"""ACE Model Info: what ACE would edit in a model, before anything is edited."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from .comfy_models import check_model, clip_width, family_of


def model_report(model, clip=None) -> str:
    """One line on the model's cross-attention (what ACE edits), and one on the CLIP if given.

    Raises UnsupportedModelError for a model ACE cannot edit.
    """
    projections = check_model(model)  # all take the family's context width once checked
    family = family_of(model)
    layers = {p.name.rsplit(".", 1)[0] for p in projections}  # "...attn2.to_k" -> "...attn2"
    context = projections[0].in_features
    inner = "/".join(str(w) for w in sorted({p.out_features for p in projections}))
    lines = [
        f"{family}: {len(layers)} cross-attention layers ({len(projections)} key/value "
        f"projections), context {context}, inner widths {inner}"
    ]
    if clip is not None:
        lines.append(_clip_line(clip, context))
    return "\n".join(lines)


def _clip_line(clip, model_context: int) -> str:
    width = clip_width(clip)
    name = type(clip.cond_stage_model).__name__
    if width == model_context:
        return f"text encoder: {name}, context {width} (matches the model)"
    return (
        f"text encoder: {name}, context {width}, but the model takes {model_context}: "
        "connect the CLIP that belongs to this model"
    )


class ModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_ModelInfo",
            display_name="ACE Model Info",
            category="ACE/inspect",
            description=(
                "Shows what ACE would edit in this model: its family and its cross-attention "
                "layers (count, text-context width, inner widths). Fails with a clear message "
                "for a model ACE does not support."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to inspect."),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional: its text encoder, to check that its context width fits the model.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="report",
                    tooltip="The report as text: family, cross-attention layers and widths.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip=None) -> io.NodeOutput:
        report = model_report(model, clip)
        return io.NodeOutput(report, ui=ui.PreviewText(report))


MODEL_INFO_NODES = [ModelInfo]
