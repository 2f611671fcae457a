"""Speed of ACE on an SD1.5-shaped random UNet (ComfyUI's own UNetModel, full size).

    .venv/bin/python benchmark/speed.py [--device cuda] [--concepts 1 50] [--steps 10]

Reports seconds per concept for stage 1 (closed form) and stage 2 (adversarial fine-tuning, per
step and for the default 40 steps), the sampling overhead of the gated model against the base
model with 1 and 50 concepts, and the peak memory of stage 2 (CUDA only). Random weights and a
random 768-wide "text encoder" stand in for SD1.5's: the cost depends on shapes, not values.
Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ace.closed_form import ClosedFormConfig, closed_form_erasure  # noqa: E402
from ace.concepts import Concept, make_request  # noqa: E402
from ace.families import cross_attention_projections  # noqa: E402
from ace.finetune import FinetuneConfig, finetune  # noqa: E402
from ace.tokens import collect_request  # noqa: E402
from toys import ToyTextEncoder  # noqa: E402

# SD1.5's UNet as ComfyUI's model detection configures it (860 M parameters, 16 cross-attention layers).
SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def comfy_unet(device, dtype):
    """ComfyUI's UNetModel with SD1.5's configuration, from the ComfyUI that set-up provides."""
    comfy_path = os.environ.get("COMFYUI_PATH") or open(os.path.join(ROOT, ".cache", "comfyui-path")).read().strip()
    sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SD15_UNET, dtype=dtype, device=device, operations=comfy.ops.manual_cast)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    unet.requires_grad_(False)
    return unet


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device, repeats=5):
    """Fastest of `repeats` runs (after a warm-up): the figure least disturbed by other work."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--steps", type=int, default=3, help="stage-2 steps to time (the default run is 40)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = comfy_unet(device, dtype)
    projections = cross_attention_projections(unet)
    modules = dict(unet.named_modules())
    weights = {p.name: modules[p.name].weight for p in projections}
    encoder = ToyTextEncoder(width=768, length=77)
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"
              + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""), "dtype": str(dtype)}

    x = torch.randn(2, 4, args.latent, args.latent, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = encoder.encode(["a painting of concept0 in a room", "a dog"]).to(device, dtype)
    def forward():
        with torch.no_grad():
            unet(x, t, context=ctx)

    base = best_of(forward, device)
    print("unet forward", base, flush=True)
    for n in args.concepts:
        request = make_request([Concept(f"concept{i}", (f"concept{i} style",), "a painting") for i in range(n)])
        tokens = collect_request(encoder, request)
        start = time.perf_counter()
        adapter, info = closed_form_erasure(tokens, weights, projections, ClosedFormConfig())
        report[f"stage1_s_per_concept_{n}"] = (time.perf_counter() - start) / n
        adapter.to(device)
        with adapter.attached(unet):
            gated = best_of(forward, device)
        base = min(base, best_of(forward, device))  # the base again, under the same conditions
        report["unet_forward_s"] = base
        report[f"sampling_overhead_{n}_concepts"] = gated / base - 1
        print(n, "concepts: stage 1 s/concept", report[f"stage1_s_per_concept_{n}"], "overhead", gated / base - 1, flush=True)
        if n == args.concepts[0]:
            def denoise(x_t, sigma, context):
                return unet(x_t.to(dtype), sigma * 0 + 500.0, context=context.to(dtype)).float()

            latents = [torch.randn(2, 4, args.latent, args.latent, device=device) for _ in tokens.concepts]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with adapter.attached(unet):
                result = finetune(adapter, denoise, tokens, latents, torch.tensor([1.0, 2.0]), FinetuneConfig(steps=args.steps, batch_size=1))
            per_step = result.seconds / args.steps
            report["stage2_s_per_step"] = per_step
            report["stage2_s_per_concept_40_steps"] = per_step * 40
            if device == "cuda":
                report["stage2_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
