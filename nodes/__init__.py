"""ComfyUI glue: one file per group of nodes, each a thin declaration over `ace/`.

Node ids carry the `ACEErasure_` prefix and never change once a workflow ships; ComfyUI's own
"AceStep" audio nodes are unrelated.
"""
from comfy_api.v0_0_2 import ComfyExtension, io

from .erase import ERASE_NODES
from .files import FILE_NODES
from .inspect_prompt import INSPECT_NODES
from .model_info import MODEL_INFO_NODES
from .toy_model import TOY_MODEL_NODES


class ACEErasureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*ERASE_NODES, *FILE_NODES, *MODEL_INFO_NODES, *INSPECT_NODES, *TOY_MODEL_NODES]


async def comfy_entrypoint() -> ACEErasureExtension:
    return ACEErasureExtension()
