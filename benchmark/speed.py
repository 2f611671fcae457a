"""Speed of ACE on an SD1.5-shaped random model: ComfyUI's own UNet and CLIP-L classes, full size.

    .venv/bin/python -m benchmark.speed [--device cuda] [--concepts 1 50] [--steps 3] [--latent 64]

Reports seconds per concept for stage 1 (with stage 0, through CLIP-L) and stage 2 (per step, and
for the default 40 steps), the sampling overhead of the erased model against the base model with
1 and 50 concepts, and the peak memory of stage 2 (CUDA only). Random weights stand in for
SD1.5's: the cost depends on shapes, not values. Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from runner import host

# SD1.5's UNet as ComfyUI's model detection configures it (860 M parameters, 16 cross-attention layers).
SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights for a module built with ComfyUI's ops (which skip initialisation):
    matrices ~ N(0, 1/fan_in), biases 0, norm scales 1."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if t.ndim >= 2:
                t.normal_(0.0, t[0].numel() ** -0.5)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.fill_(1.0)


def random_sd15(dtype: torch.dtype):
    """(MODEL, CLIP) of SD1.5's shapes, random, as ComfyUI objects."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device="cpu")
    randomize_(base.diffusion_model)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=torch.device("cpu"))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed=1)
    return model, clip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device: str, repeats: int = 5) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--steps", type=int, default=3, help="stage-2 steps to time (the default run is 40)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    pack = host.start(device=args.device)
    device = host.host().device
    ace, comfy_models = pack.ace, pack.nodes.comfy_models
    import comfy.model_management

    dtype = torch.float16 if device == "cuda" else torch.float32
    model, clip = random_sd15(dtype)
    network = comfy_models.network_of(model, clip, resolution=8 * args.latent)
    report = {"machine": host.machine(), "device": device, "dtype": str(dtype), "latent": args.latent}

    x = torch.randn(2, 4, args.latent, args.latent)
    sigma = torch.tensor([2.0, 2.0])
    context = network.encoder.encode(["a painting of concept0 in a room", "a dog"])

    def forward(m):
        comfy.model_management.load_models_gpu([m])
        with torch.no_grad():
            m.model.apply_model(x.to(m.load_device), sigma.to(m.load_device), c_crossattn=context.to(m.load_device))

    base_s = best_of(lambda: forward(model), device)
    for n in args.concepts:
        request = ace.concepts.make_request([ace.concepts.Concept(f"concept{i}", (f"concept{i} style",), "a painting")
                                             for i in range(n)])
        closed = ace.erasure.erase(network, request, training=ace.finetune.FinetuneConfig(steps=0))
        report[f"stage1_s_per_concept_{n}"] = closed.info["stage1_seconds"] / n
        erased = comfy_models.with_erasure(model, closed, 1.0)
        gated_s = best_of(lambda: forward(erased), device)
        base_s = min(base_s, best_of(lambda: forward(model), device))  # the base again, under the same conditions
        report["unet_forward_s"] = base_s
        report[f"sampling_overhead_{n}_concepts"] = gated_s / base_s - 1
        print(f"{n} concepts: stage 1 {report[f'stage1_s_per_concept_{n}']:.2f} s/concept, sampling overhead "
              f"{gated_s / base_s - 1:+.1%}", flush=True)
        if n == args.concepts[0]:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            training = ace.finetune.FinetuneConfig(steps=args.steps, batch_size=1, images_per_concept=1)
            small = dataclasses.replace(network, sample_sigmas=network.sample_sigmas[-3:])  # two sampling steps
            tuned = ace.erasure.fine_tune(closed, small, training)
            per_step = tuned.info["stage2_seconds"] / args.steps
            report["stage2_s_per_step"] = per_step
            report["stage2_s_per_concept_40_steps"] = per_step * 40
            if device == "cuda":
                report["stage2_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"stage 2: {per_step:.2f} s/step", flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
