"""Fixtures: a real ComfyUI in this process (or as a server) with this pack and tiny models.

The helpers live in comfy_harness.py; these fixtures only give them a lifetime. Nothing that
needs ComfyUI starts unless a test asks for one of these fixtures.
"""
from __future__ import annotations

import pytest

import comfy_harness as harness


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> harness.host.Host:
    """ComfyUI initialised in-process (CPU, temp folders) with its extra nodes and this pack."""
    return harness.init_comfyui(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy):
    """Path of the cached tiny SD1.5-format checkpoint (built into .cache/test-models/ once)."""
    return harness.tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def tiny_sd15_name(comfy, tiny_sd15_checkpoint) -> str:
    """The tiny checkpoint's name as CheckpointLoaderSimple lists it (`ckpt_name` in graphs)."""
    return harness.install_checkpoint(tiny_sd15_checkpoint, comfy.base_dir / "models")


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sd15_name):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by ComfyUI's CheckpointLoaderSimple.
    Shared by the session: clone the MODEL (`model.clone()`) before patching it."""
    model, clip, vae = harness.load_checkpoint(tiny_sd15_name)
    assert type(model.model.model_config).__name__ == "SD15"
    return model, clip, vae


@pytest.fixture
def sd2_model(comfy):
    """A fresh in-memory SD2.x-family MODEL (ComfyUI's SD20 config; small, 1024-wide context)."""
    return harness.tiny_sd2_model()


@pytest.fixture
def sdxl_model(comfy):
    """A fresh in-memory SDXL-family MODEL (ComfyUI's SDXL config; small, 2048-wide context)."""
    return harness.tiny_sdxl_model()


@pytest.fixture(scope="session")
def sd2_clip(comfy):
    """SD2.x's real text encoder classes (OpenCLIP-H through ComfyUI's SD2ClipModel), random, 3 layers."""
    return harness.tiny_sd2_clip()


@pytest.fixture(scope="session")
def sdxl_clip(comfy):
    """SDXL's real text encoder classes (CLIP-L + CLIP-G through ComfyUI's SDXLClipModel), random, 3 layers each."""
    return harness.tiny_sdxl_clip()


@pytest.fixture
def flux_model(comfy):
    """A fresh in-memory Flux MODEL: another family, with no attn2 cross-attention."""
    return harness.tiny_flux_model()


@pytest.fixture
def sd1_without_cross_attention(comfy):
    """A fresh in-memory SD15-config MODEL whose UNet has no cross-attention layers."""
    return harness.tiny_sd1_without_cross_attention()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_sd15_checkpoint):
    """ComfyUI's real server in a subprocess with this pack and the tiny checkpoint."""
    with harness.ComfyServer(tmp_path_factory.mktemp("server"), [tiny_sd15_checkpoint]) as server:
        yield server
