"""ComfyUI entry point of the ACE concept-erasure node pack.

ComfyUI imports this file at start-up; it only re-exports the extension from `nodes/` so that
start-up stays cheap. The algorithm lives in `ace/`, importable without ComfyUI.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # web/docs/<node id>.md: the help page ComfyUI's frontend shows for each node

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
