"""Nodes that save, load, export and bake erasures.

Erasures live in ComfyUI's `models/ace_erasures/` (registered with folder_paths, so
extra_model_paths.yaml can add more folders); portable LoRAs go to `models/loras/`, where
ComfyUI's own LoraLoader finds them. A baked MODEL carries its erasure in its weights, so that
ComfyUI's Save Checkpoint writes an erased checkpoint.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..ace.adapter import check_strength
from ..ace.files import check_file_name, export_lora, load_erasure, save_erasure
from .comfy_models import baked
from .erase import Erasure_

FOLDER = "ace_erasures"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    folder_paths.folder_names_and_paths[FOLDER] = (folder_paths.folder_names_and_paths[FOLDER][0], {".safetensors"})



def _target(folder: str, file_name: str, overwrite: bool) -> str:
    name = check_file_name(file_name)
    directory = folder_paths.get_folder_paths(folder)[0]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{name}' already exists in {folder}; choose another name or turn on overwrite.")
    return path


class SaveErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_Save",
            display_name="ACE Save Erasure",
            category="ACE/files",
            description="Save an erasure (the gated ACE edit, a few MB) into models/ace_erasures as .safetensors.",
            inputs=[
                Erasure_.Input("erasure", tooltip="The erasure to save."),
                io.String.Input("file_name", default="ace_erasure", tooltip="A plain file name (no folders); .safetensors is added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name."),
            ],
            outputs=[io.String.Output(display_name="FILE", tooltip="The saved file's name, as ACE Load Erasure lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, erasure, file_name, overwrite) -> io.NodeOutput:
        path = _target(FOLDER, file_name, overwrite)
        save_erasure(erasure, path)
        name = os.path.basename(path)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name}"))


class LoadErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_Load",
            display_name="ACE Load Erasure",
            category="ACE/files",
            description="Load an erasure saved by ACE Save Erasure from models/ace_erasures.",
            inputs=[io.Combo.Input("file_name", options=folder_paths.get_filename_list(FOLDER), tooltip="An erasure file in models/ace_erasures.")],
            outputs=[Erasure_.Output(display_name="ERASURE", tooltip="The loaded erasure; apply it with ACE Apply Erasure.")],
        )

    @classmethod
    def execute(cls, file_name) -> io.NodeOutput:
        check_file_name(file_name)
        path = folder_paths.get_full_path(FOLDER, file_name)
        if path is None:
            raise FileNotFoundError(f"There is no erasure '{file_name}' in models/{FOLDER}.")
        return io.NodeOutput(load_erasure(path))


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_ExportLoRA",
            display_name="ACE Export LoRA",
            category="ACE/files",
            description=(
                "Export the erasure as a standard LoRA into models/loras, for ComfyUI's LoraLoader, "
                "A1111 or diffusers. The LoRA has no gate: it also shifts prompts unrelated to the "
                "concept a little, which the gated erasure does not."
            ),
            inputs=[
                Erasure_.Input("erasure", tooltip="The erasure to export."),
                io.String.Input("file_name", default="ace_erasure_lora", tooltip="A plain file name (no folders); .safetensors is added."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05, tooltip="Baked into the LoRA's weights."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name."),
                io.Int.Input("rank", default=0, min=0, max=1024, optional=True, tooltip="0: exact, the joint edit at its full rank (64 per concept, up to 256). Any other value: the edits of all concepts compressed together to this rank (SVD); the node reports the error."),
            ],
            outputs=[io.String.Output(display_name="LORA_NAME", tooltip="The LoRA's name as LoraLoader lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, erasure, file_name, strength, overwrite, rank=0) -> io.NodeOutput:
        check_strength(strength)
        path = _target("loras", file_name, overwrite)
        lora = export_lora(erasure, path, strength, rank or None)
        name = os.path.basename(path)
        error = f", error {lora.max_error:.2%} at most (mean {lora.mean_error:.2%})" if lora.max_error else " (exact)"
        return io.NodeOutput(name, ui=ui.PreviewText(f"exported {name} to models/loras: rank {lora.rank}{error}"))


class BakeErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_Bake",
            display_name="ACE Bake Erasure",
            category="ACE/files",
            description=(
                "Write the erasures of an erased MODEL into its weights, so that Save Checkpoint (and every "
                "node that saves or merges weights) keeps them. Baking opens the gate: the edit then also "
                "shifts prompts unrelated to the concepts a little, as the exported LoRA does. Savers refuse "
                "an erased MODEL that is not baked."
            ),
            inputs=[io.Model.Input("model", tooltip="A MODEL out of ACE Erase Concept or ACE Apply Erasure (not changed).")],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The same erasures in the weights, at the strength they were applied with; connect it to Save Checkpoint.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(baked(model))


FILE_NODES = [SaveErasure, LoadErasure, ExportLoRA, BakeErasure]
