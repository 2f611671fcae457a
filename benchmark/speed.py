"""Speed of ACE on SD1.5- and SDXL-shaped random models: ComfyUI's own UNet and CLIP classes.

    .venv/bin/python -m benchmark.speed [--device cuda] [--family sd15 sdxl] [--solve 2] [--concepts 1 50]
                                        [--steps 3] [--resolution PX] [--small] [--out FILE]

Per family, at its native resolution (SD1.5 512 px, SDXL 1024 px; `--resolution` for another):
seconds per concept of stage 1 (the closed form, and with stage 0 through the family's real CLIP
classes) when `--solve` concepts are solved at once, of concept expansion for one concept (its
vocabulary scan, its response gradient and its response test; expansion goes concept by concept), of stage 2 per step
and for the default number of steps (at the default batch, precision and checkpointing of the
device), and the sampling overhead of the erased model against the base model for each
`--concepts` count. Random weights stand in for the real ones: the cost depends on shapes, not
values. `--small` builds the same layouts at a fifth of the width, with 3-layer text encoders, at
256 px, and asks expansion's response test about 4 + 4 words (by value space and by response
gradient) with 2 noise draws instead of 48 + 48 and 8: a smoke run for a CPU, whose figures say
nothing about the real models. The response test costs (1 + words + kept concepts) × 2 noise
levels × draws pictures through the UNet, so a reduced test (`--expansion-words`,
`--expansion-draws`) times a full one by proportion; the gradient costs 2 noise levels × (2
forward passes and one backward) of `draws` pictures. Run it with nothing else on the machine.

The sampling overhead of N concepts is timed with an erasure whose N gates are copies of one
solved concept's gate and whose joint edit has the rank N concepts get (the rank per concept times
N, at most the cap): what they cost depends on their shapes only, and solving 50 SDXL concepts in
closed form would take minutes of this benchmark's budget without changing the figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass

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
# SDXL base's UNet as ComfyUI's model detection configures it (2.6 B parameters, 70 transformer
# blocks, 140 cross-attention projections), pooled-text and size conditioning of 2816.
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)


@dataclass(frozen=True)
class Shape:
    """A model shape the benchmarks build: ComfyUI's config class, its UNet, its native
    resolution, and the depth of its text encoder towers (None: full depth)."""

    name: str
    config: str
    unet: dict
    resolution: int
    clip_options: dict


# --small: a fifth of the channels (64 instead of 320, heads of 32 instead of 64 for SDXL), the
# same levels and transformer depths, 3-layer text encoder towers, 256 px.
SMALL_CLIP = {"num_hidden_layers": 3}
SHAPES = {
    ("sd15", False): Shape("sd15", "SD15", SD15_UNET, 512, {}),
    ("sdxl", False): Shape("sdxl", "SDXL", SDXL_UNET, 1024, {}),
    ("sd15", True): Shape("sd15", "SD15", {**SD15_UNET, "model_channels": 64}, 256,
                          {"clip_l_model_config": SMALL_CLIP}),
    ("sdxl", True): Shape("sdxl", "SDXL", {**SDXL_UNET, "model_channels": 64, "num_head_channels": 32}, 256,
                          {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP}),
}


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


def weight_dtype(device: str) -> torch.dtype:
    """The dtype ComfyUI loads SD1.5 and SDXL weights in: fp16 on a GPU, fp32 on the CPU."""
    return torch.float16 if device == "cuda" else torch.float32


def random_model(shape: Shape, device: str):
    """(MODEL, CLIP) of `shape`, random, as ComfyUI objects; the UNet built on `device` directly."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    dtype = weight_dtype(device)
    config = getattr(comfy.supported_models, shape.config)(dict(shape.unet))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    randomize_(base.diffusion_model)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(target=config.clip_target(), model_options={**shape.clip_options, "dtype": dtype})
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


def concepts(ace, n: int):
    return ace.concepts.make_request([ace.concepts.Concept(f"concept{i}", (f"concept{i} style",), "a painting")
                                      for i in range(n)])


def tiled(ace, erasure, n: int):
    """An erasure of `n` concepts: `n` copies of `erasure`'s first gate, and its edit repeated to the
    rank n concepts get (see the module's note)."""
    a = erasure.adapter
    config = ace.closed_form.ClosedFormConfig()
    rank = min(config.rank * n, config.max_rank)
    copies = -(-rank // a.rank)
    adapter = ace.adapter.GatedAdapter(
        a.projections, a.gate_basis.detach()[:1].repeat(n, 1, 1), a.gate_center[:1].repeat(n, 1),
        a.gate_threshold.detach()[:1].repeat(n), a.gate_log_temperature.detach()[:1].repeat(n),
        [d.detach().repeat(copies, 1)[:rank] for d in a.lora_down],
        [u.detach().repeat(1, copies)[:, :rank] / copies for u in a.lora_up], gate_scope=a.gate_scope)
    return ace.erasure.Erasure(erasure.family, concepts(ace, n), adapter, erasure.num_res_blocks)


def measure(pack, shape: Shape, device: str, concept_counts: list[int], steps: int, solve: list[int],
            resolution: int, expansion) -> dict:
    """The figures of one model shape (see the module's docstring)."""
    import comfy.model_management

    ace, comfy_models = pack.ace, pack.nodes.comfy_models
    model, clip = random_model(shape, device)
    network = comfy_models.network_of(model, clip, resolution=resolution)
    training = ace.finetune.FinetuneConfig(steps=steps)
    report = {"unet_parameters_m": sum(p.numel() for p in comfy_models.unet_of(model).parameters()) / 1e6,
              "cross_attention_projections": len(network.projections), "resolution": resolution,
              "weight_dtype": str(weight_dtype(device)).removeprefix("torch."),
              "stage2_compute": dataclasses.asdict(network.compute), "stage2_batch": training.batch_size,
              "stage1_s_per_concept": {}, "stages01_s_per_concept": {}}

    for n in solve:  # stage 1 (the closed form) alone, and with stage 0 (every prompt through the CLIP)
        started = time.perf_counter()
        solved = ace.erasure.erase(network, concepts(ace, n), training=ace.finetune.FinetuneConfig(steps=0),
                                   expansion=ace.expansion.ExpansionConfig(enabled=False))
        report["stages01_s_per_concept"][str(n)] = (time.perf_counter() - started) / n
        report["stage1_s_per_concept"][str(n)] = solved.info["closed_form_seconds"] / n
        print(f"{shape.name}: {n} concept(s) at once: stage 1 {report['stage1_s_per_concept'][str(n)]:.2f} s/concept, "
              f"with stage 0 {report['stages01_s_per_concept'][str(n)]:.2f}", flush=True)
        if n == solve[0]:
            closed = solved
    # Expansion works concept by concept (its cost grows linearly), so one concept times it.
    found = ace.expansion.expand(network, concepts(ace, 1), expansion)
    report["expansion"] = {"config": dataclasses.asdict(expansion), "s_per_concept": found.seconds}
    print(f"{shape.name}: expansion {sum(found.seconds.values()):.2f} s/concept ({found.seconds})", flush=True)

    small = dataclasses.replace(network, sample_sigmas=network.sample_sigmas[-3:])  # two sampling steps
    first = tiled(ace, closed, 1)  # stage 2 of one concept
    tuned = ace.erasure.fine_tune(first, small, training)
    report["stage2_s_per_step"] = tuned.info["stage2_seconds"] / steps
    report["stage2_default_steps"] = ace.finetune.FinetuneConfig().steps
    report["stage2_s_per_concept"] = report["stage2_s_per_step"] * report["stage2_default_steps"]
    print(f"{shape.name}: stage 2 {report['stage2_s_per_step']:.2f} s/step", flush=True)

    side = resolution // 8
    x = torch.randn(2, 4, side, side).to(model.load_device)
    sigma = torch.tensor([2.0, 2.0], device=model.load_device)
    context, pooled = network.encoder.encode_pooled(["a painting of concept0 in a room", "a dog"])
    context = context.to(model.load_device)
    pooled = None if pooled is None else pooled.to(model.load_device)

    def forward(m):
        comfy.model_management.load_models_gpu([m])
        y = comfy_models.adm_conditioning(m.model, x, pooled)
        with torch.no_grad():
            m.model.apply_model(x, sigma, c_crossattn=context, **({} if y is None else {"y": y}))

    base_s = best_of(lambda: forward(model), device)
    report["sampling_overhead"] = {}
    for n in concept_counts:
        erased = comfy_models.with_erasure(model, tiled(ace, closed, n), 1.0)
        gated_s = best_of(lambda m=erased: forward(m), device)
        base_s = min(base_s, best_of(lambda: forward(model), device))  # the base again, under the same conditions
        report["sampling_overhead"][str(n)] = gated_s / base_s - 1
        print(f"{shape.name}: {n} concepts, sampling overhead {gated_s / base_s - 1:+.1%}", flush=True)
        del erased
    report["unet_forward_s"] = base_s
    comfy.model_management.unload_all_models()
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--family", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 50], help="concept counts of the sampling overhead")
    parser.add_argument("--solve", type=int, nargs="+", default=[2],
                        help="concept counts solved at once to time stages 0-1 (the first is the one fine-tuned)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: each family's native)")
    parser.add_argument("--steps", type=int, default=3, help="stage-2 steps to time")
    parser.add_argument("--small", action="store_true", help="small layouts at 256 px (a CPU smoke run)")
    parser.add_argument("--expansion-words", type=int, default=0,
                        help="words expansion's response test asks about, by each ranking (value space, response "
                             "gradient; default 48 each; --small: 4)")
    parser.add_argument("--expansion-draws", type=int, default=0,
                        help="noise draws per noise level of that test (default 8; --small: 2)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    pack = host.start(device=args.device)
    device = host.host().device
    expansion = pack.ace.expansion.ExpansionConfig()
    if args.small:  # a smoke run: the response test's forward passes at a CPU's pace would take minutes
        expansion = dataclasses.replace(expansion, candidates=4, gradient_candidates=4, noise_draws=2)
    if args.expansion_words or args.expansion_draws:
        words = args.expansion_words or expansion.candidates
        expansion = dataclasses.replace(expansion, candidates=words, gradient_candidates=words,
                                        noise_draws=args.expansion_draws or expansion.noise_draws)
    report = {"machine": host.machine(), "device": device, "small": args.small, "families": {},
              "command": " ".join(["python -m benchmark.speed", *(argv if argv is not None else sys.argv[1:])])}
    for name in args.family:
        shape = SHAPES[name, args.small]
        report["families"][name] = measure(pack, shape, device, args.concepts, args.steps, args.solve,
                                           args.resolution or shape.resolution, expansion)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
