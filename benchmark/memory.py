"""Peak memory of stage 2 on SD1.5- and SDXL-shaped random models, with and without gradient
checkpointing, at their native resolutions (SD1.5 512 px, SDXL 1024 px).

    .venv/bin/python -m benchmark.memory [--device cuda] [--family sd15 sdxl] [--checkpointing off on]
                                         [--precision auto] [--steps 2] [--small] [--out FILE]

Each model shape runs in a process of its own (on the CPU, each configuration: a process's
resident memory does not come back down), so that one that runs out of memory does not end the
others. In it: the random model (the shapes of `benchmark.speed`, weights in the dtype ComfyUI
loads them in: fp16 on a GPU, fp32 on the CPU), stages 0-1 for one concept, then, per setting,
every model unloaded and stage 2 (`ace.erasure.fine_tune`: the concept's examples, then
`--steps` steps at the default batch) measured alone. The text encoder's
embeddings are kept from stage 0, so the CLIP stays unloaded during stage 2, as ComfyUI offloads
it when memory is short. Measured:

- on CUDA, torch's allocator: `peak_gb` (the most memory allocated at once during stage 2, the
  UNet's weights included), `reserved_gb` (what the allocator held, which `nvidia-smi` shows
  minus the CUDA context), `start_gb` (allocated when stage 2 began);
- on the CPU, the process's resident memory, sampled every 2 ms: `peak_gb` (the UNet's weights
  plus the most stage 2 added to what the process held when it began) and `process_peak_gb`
  (everything the process held at its peak, the Python runtime, ComfyUI and the text encoder
  included).

`--small` builds the small layouts of `benchmark.speed` at 256 px: a smoke run for a CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch

from benchmark import speed
from runner import host

GB = 2**30


class CachedEncoder:
    """A text encoder that encodes each prompt once and then answers from its cache: stage 2
    re-collects stage 0's prompts, and the CLIP must not come back into memory for them. The
    rest (stage 2's soft-word attack runs through the CLIP, as it does for a user) goes to the
    encoder itself."""

    def __init__(self, encoder):
        self.encoder, self.start_tokens = encoder, encoder.start_tokens
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def count_tokens(self, text: str) -> int:
        return self.encoder.count_tokens(text)

    def encode_pooled(self, prompts):
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            context, pooled = self.encoder.encode_pooled(missing)
            for i, p in enumerate(missing):
                self.cache[p] = (context[i].cpu(), None if pooled is None else pooled[i].cpu())
        rows = [self.cache[p] for p in prompts]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return torch.stack([r[0] for r in rows]), pooled

    def encode(self, prompts):
        return self.encode_pooled(prompts)[0]

    def __getattr__(self, name):
        return getattr(self.encoder, name)


class ResidentPeak:
    """The largest resident memory of this process while the block runs (sampled every 2 ms)."""

    def __init__(self):
        self.peak = self.start = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(family: str, checkpointing: list[str], precision: str, steps: int, small: bool, device: str) -> list[dict]:
    """Stage 2's peak memory for one model shape and each checkpointing setting, in this process
    (see the module's docstring): the model and stages 0-1 once, then stage 2 once per setting."""
    pack = host.start(device=device)
    device = host.host().device
    import comfy.model_management

    ace, comfy_models = pack.ace, pack.nodes.comfy_models
    shape = speed.SHAPES[family, small]
    model, clip = speed.random_model(shape, device)
    encoder = CachedEncoder(comfy_models.text_encoder(model, clip))
    weights = sum(p.numel() * p.element_size() for p in comfy_models.unet_of(model).parameters())
    training = ace.finetune.FinetuneConfig(steps=steps)
    closed = None
    reports = []
    for setting in checkpointing:
        compute = comfy_models.training_compute(model, precision, setting)
        network = comfy_models.model_network(model, encoder, resolution=shape.resolution, compute=compute)
        network = dataclasses.replace(network, sample_sigmas=network.sample_sigmas[-3:])  # two sampling steps
        if closed is None:
            closed = ace.erasure.erase(network, speed.concepts(ace, 1), training=ace.finetune.FinetuneConfig(steps=0),
                                       expansion=ace.expansion.ExpansionConfig(enabled=False))
        report = {"family": family, "resolution": shape.resolution, "small": small, "device": device,
                  "weight_dtype": str(speed.weight_dtype(device)).removeprefix("torch."),
                  "precision": compute.precision, "checkpointing": compute.checkpointing,
                  "batch": training.batch_size, "steps": steps, "unet_weights_gb": weights / GB}
        comfy.model_management.unload_all_models()
        gc.collect()
        started = time.perf_counter()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            tuned = ace.erasure.fine_tune(closed, network, training)
            report |= {"start_gb": start / GB, "peak_gb": torch.cuda.max_memory_allocated() / GB,
                       "reserved_gb": torch.cuda.max_memory_reserved() / GB}
        else:
            with ResidentPeak() as resident:
                tuned = ace.erasure.fine_tune(closed, network, training)
            report |= {"start_gb": resident.start / GB, "process_peak_gb": resident.peak / GB,
                       "peak_gb": (weights + resident.peak - resident.start) / GB}
        report["seconds"] = time.perf_counter() - started
        report["final_losses"] = tuned.info["history"][-1]
        reports.append(report)
    return reports


def run_child(args, family: str, checkpointing: list[str]) -> list[dict]:
    """`measure` in a process of its own; its reports, or what went wrong."""
    command = [sys.executable, "-m", "benchmark.memory", "--one", family, *checkpointing, "--device", args.device,
               "--precision", args.precision, "--steps", str(args.steps)] + (["--small"] if args.small else [])
    failed = [{"family": family, "checkpointing": setting == "on"} for setting in checkpointing]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [f | {"error": f"timed out after {args.timeout:g} s"} for f in failed]
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return [f | {"error": f"exit {run.returncode}: {tail}"} for f in failed]
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--family", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="stage 2's precision (default: the device's, as the nodes choose it)")
    parser.add_argument("--steps", type=int, default=2, help="stage-2 steps per configuration")
    parser.add_argument("--small", action="store_true", help="small layouts at 256 px (a CPU smoke run)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per process")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--one", nargs="+", metavar="FAMILY CHECKPOINTING", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one shape, its reports as the last line
        family, *checkpointing = args.one
        print(json.dumps(measure(family, checkpointing, args.precision, args.steps, args.small, args.device)))
        return
    report = {"machine": host.machine(), "small": args.small, "runs": [],
              "command": " ".join(["python -m benchmark.memory", *(argv if argv is not None else sys.argv[1:])])}
    # CUDA's allocator restarts its peak on request, so one process per shape measures every
    # setting; the resident memory of a CPU process does not come back down: one per setting.
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    jobs = [(f, args.checkpointing) for f in args.family] if cuda else \
        [(f, [c]) for f in args.family for c in args.checkpointing]
    for family, checkpointing in jobs:
        for run in run_child(args, family, checkpointing):
            report["runs"].append(run)
            figure = f"peak {run['peak_gb']:.2f} GB" if "peak_gb" in run else run["error"]
            print(f"{family}, checkpointing {'on' if run['checkpointing'] else 'off'}: {figure}", flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
