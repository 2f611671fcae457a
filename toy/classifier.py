"""A small CNN that says which object, colour and style a 16x16 picture of the world shows.

Trained on clean renders of `toy/world.py` (with a little pixel noise, so that it reads
generated pictures too), it is the benchmark's judge: the fraction of a model's generations for a
concept's prompts that it recognises as that concept.

    python -m toy.classifier --threads 1          # train, test on held-out renders, save

The weights are `toy/weights/classifier.safetensors`; `load_classifier()` reads them and
`classify(net, images)` returns the predicted object, colour and style names.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from . import world

WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
REPORT = Path(__file__).resolve().parent / "weights" / "classifier.json"
HEADS = {"object": world.OBJECTS, "colour": world.COLOURS, "style": world.STYLES}


class WorldClassifier(nn.Module):
    """Three conv stages (16 -> 8 -> 4 pixels) and one linear head per attribute."""

    def __init__(self):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(3, 32), nn.MaxPool2d(2), stage(32, 64), nn.MaxPool2d(2), stage(64, 96),
                                      nn.Flatten(), nn.Linear(96 * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 16, 16) in [0, 1] -> the 128 features the heads read (the benchmark's FID space)."""
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, 16, 16) in [0, 1] -> logits per attribute."""
        h = self.embed(images)
        return {k: head(h) for k, head in self.heads.items()}


def random_specs(rng: random.Random, n: int) -> list[world.Spec]:
    return [world.Spec(rng.choice(world.OBJECTS), rng.choice(world.COLOURS), rng.choice(world.STYLES)) for _ in range(n)]


def labels(specs: list[world.Spec]) -> dict[str, torch.Tensor]:
    return {
        "object": torch.tensor([world.OBJECTS.index(s.object) for s in specs]),
        "colour": torch.tensor([world.COLOURS.index(s.colour) for s in specs]),
        "style": torch.tensor([world.STYLES.index(s.style) for s in specs]),
    }


@torch.no_grad()
def classify(net: WorldClassifier, images: torch.Tensor) -> dict[str, list[str]]:
    """Predicted object, colour and style names for images (B, 3, 16, 16) in [0, 1]."""
    net.eval()
    logits = net(images.float().clamp(0, 1))
    return {k: [HEADS[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


def shows(pred: dict[str, list[str]], i: int, prompt: world.Prompt, kind: str) -> bool:
    """Whether picture `i` of `classify`'s predictions shows the concept of `kind` the prompt asks
    for: that attribute, or for an entity all three of its attributes."""
    keys = ("object", "colour", "style") if kind == "entity" else (kind,)
    return all(pred[k][i] == getattr(prompt, k) for k in keys)


@torch.no_grad()
def accuracy(net: WorldClassifier, images: torch.Tensor, specs: list[world.Spec]) -> dict[str, float]:
    pred = classify(net, images)
    acc = {k: sum(p == getattr(s, k) for p, s in zip(pred[k], specs)) / len(specs) for k in HEADS}
    acc["all"] = sum(all(pred[k][i] == getattr(s, k) for k in HEADS) for i, s in enumerate(specs)) / len(specs)
    return acc


def train(steps: int = 1500, batch: int = 128, seed: int = 0, log=print) -> WorldClassifier:
    """Train on fresh renders every step (seeds disjoint from the test renders), with pixel noise."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    net = WorldClassifier()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        specs = random_specs(rng, batch)
        x = world.render_batch(specs, gen)
        # Robustness to generated pictures: Gaussian pixel noise and a random brightness shift.
        x = x + torch.randn_like(x) * torch.rand(batch, 1, 1, 1) * 0.1 + (torch.rand(batch, 1, 1, 1) - 0.5) * 0.1
        y = labels(specs)
        net.train()
        logits = net(x.clamp(0, 1))
        loss = sum(loss_fn(logits[k], y[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}")
    return net.eval()


def heldout_renders(n: int = 4000, seed: int = 123457):
    """Clean renders the classifier never trained on (their own seed stream)."""
    rng = random.Random(seed)
    specs = random_specs(rng, n)
    return world.render_batch(specs, torch.Generator().manual_seed(seed)), specs


def save(net: WorldClassifier, path: Path = WEIGHTS) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_classifier(path: Path | str = WEIGHTS) -> WorldClassifier:
    """The committed classifier, ready to `classify`."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"The benchmark classifier's weights are missing at {path}; "
                                "run `python -m toy.classifier` to train them.")
    net = WorldClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    net = train(args.steps)
    train_s = time.time() - t0
    images, specs = heldout_renders()
    acc = accuracy(net, images, specs)
    print("held-out clean renders:", {k: round(v, 4) for k, v in acc.items()}, f"(trained in {train_s:.0f} s)")
    save(net, args.out)
    report = {
        "heldout_accuracy": acc,
        "heldout_renders": len(specs),
        "chance": {k: 1 / len(v) for k, v in HEADS.items()},
        "train_steps": args.steps,
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "command": "python -m toy.classifier" + (f" --threads {args.threads}" if args.threads else ""),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
