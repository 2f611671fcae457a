"""The command line: erase concepts from a checkpoint in batch, without ComfyUI's GUI.

    python -m runner erase model.safetensors --concepts "Van Gogh: Vincent van Gogh\\nMonet" \\
        --anchor "a painting" --preserve "Rembrandt" --erasure no_painters.safetensors
    python -m runner erase --toy --concepts "circle: disc" --lora no_circle.safetensors \\
        --eval prompts.json --eval-dir eval/

It does what the ACE Erase Concept node does, through the same code: ComfyUI starts in this
process (`runner.host`, which loads this pack as ComfyUI loads it), loads the checkpoint with its
own loader, the erasure comes from the pack's `nodes/erase.py: erase_from_model`, and
`ace/files.py` writes the erasure file and the portable LoRA. `--eval` then renders prompts with
ComfyUI's sampler through the base and the erased model and measures the difference.

Nothing here imports torch or ComfyUI at import time: the checks of the arguments that need
neither run first and fail in a fraction of a second; the concept list is checked by the pack's
own parser once ComfyUI is up (a few seconds), before anything slow.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import toy
from ace.presets import NO_PRESET, preset_names  # plain data: the choices, before ComfyUI starts
from runner import host
from runner.pictures import Row, grid, to_image

OUTPUT_SUFFIX = ".safetensors"
# Sampler of the evaluation renders for checkpoints (the toy model has its own, toy.SAMPLER).
CHECKPOINT_SAMPLER = {"sampler_name": "euler", "scheduler": "normal", "steps": 20, "cfg": 7.0}
MAX_SEED = 0xFFFFFFFF  # as the nodes' seed inputs

PROMPT_FILE_HELP = """\
prompt file (--eval), JSON:
  {
    "erase": ["a painting by Van Gogh", "starry night, Vincent van Gogh"],
    "keep": ["a painting by Monet", "a photo of a cat"],
    "negative": "blurry"
  }
  "erase": prompts that should lose the concepts; "keep": prompts that should render as before;
  "negative" (optional): the negative prompt of every render. Each prompt is rendered by the base
  and the erased model with the same seed and noise. --eval-dir receives <group>-NN-base.png,
  <group>-NN-erased.png, grid.png (one row per prompt: base | erased) and eval.json: per prompt
  gate_max (the largest gate of the erasure on the prompt's tokens: about 1 where it acts, about
  0 where it leaves the prompt alone), latent_change and image_change (mean absolute difference
  of the erased render from the base render, in latent units and in image units 0..1).
"""


class CommandError(Exception):
    """A problem the user can fix, reported as one line with a non-zero exit status."""


# --- arguments ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runner",
        description="ACE (Attentional Concept Erasure) from the command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    erase = commands.add_parser(
        "erase",
        help="erase concepts from a checkpoint (or the toy model); write an erasure and/or a LoRA",
        description=(
            "Erase concepts from a Stable Diffusion 1.x / 2.x / XL checkpoint (or ACE's toy model)\n"
            "model) with ACE, as the ACE Erase Concept node does, and write the erasure (for ACE Load\n"
            "Erasure) and/or a portable LoRA (for ComfyUI's LoraLoader, A1111, diffusers); optionally\n"
            "render prompts through the model before and after."
        ),
        epilog=PROMPT_FILE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = erase.add_argument_group("model (one of)")
    model.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                       help="a checkpoint file (.safetensors, .ckpt) as ComfyUI's Load Checkpoint reads it")
    model.add_argument("--toy", nargs="?", const=toy.DEFAULT_MODEL, choices=("causal", "bidirectional"),
                       metavar="ENCODER", help="ACE's toy model (toy/model.py) instead; ENCODER: causal or "
                                               f"bidirectional (default {toy.DEFAULT_MODEL})")

    what = erase.add_argument_group("what to erase (--preset and/or --concepts or --concepts-file)")
    what.add_argument("--preset", choices=preset_names(), metavar="NAME",
                      help="start from a curated concept list with its suggested anchor and preserve list "
                           f"(presets/NAME.json): {', '.join(preset_names())}; --concepts, --anchor and --preserve "
                           "add to it. A starting point, not a guarantee")
    concepts = what.add_mutually_exclusive_group()
    concepts.add_argument("--concepts", metavar="TEXT",
                          help="one concept per line (a real newline or \\n), synonyms after a colon, separated by "
                               "commas: 'Van Gogh: Vincent van Gogh, van gogh style\\nMonet'")
    concepts.add_argument("--concepts-file", metavar="FILE",
                          help="read the concept list from a text file, in the same format (# starts a comment line)")
    what.add_argument("--anchor", default="", metavar="TEXT",
                      help="what the concepts become, e.g. 'a painting' (default: nothing, or the preset's)")
    what.add_argument("--preserve", default="", metavar="TEXT",
                      help="concepts that must render as before, separated by commas: 'Rembrandt, Picasso'")

    how = erase.add_argument_group("how")
    how.add_argument("--steps", type=int, default=40, metavar="N",
                     help="stage-2 adversarial fine-tuning steps; 0 = closed form only (default 40)")
    how.add_argument("--rank", type=int, default=64, metavar="R",
                     help="rank of the edit per concept and layer (default 64; the joint edit: rank x concepts, at most 256)")
    how.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the fine-tuning and of the evaluation renders (default 0)")
    how.add_argument("--no-expand", action="store_true",
                     help="erase only the words given; by default ACE also erases the other words the model draws each "
                          "concept from, found in the model itself, and prints them")
    how.add_argument("--resolution", type=int, metavar="PX",
                     help="image size of the fine-tuning examples and of the evaluation renders, a multiple of 8 "
                          "(default: 512 for SD1, 768 for SD2, 1024 for SDXL, 128 for the toy model, whose 16x16 "
                          "pixels stand in for a 128 px image's latent)")
    how.add_argument("--strength", type=float, default=1.0,
                     help="strength of the erasure in the evaluation, and baked into the LoRA (default 1)")
    how.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to run (default: the GPU if torch sees one)")
    how.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="the network's precision in stage 2: bf16/fp16 autocast, or fp32 = the dtype the model "
                          "loads in (default auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU)")
    how.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                     help="gradient checkpointing in stage 2: far less memory, one more forward pass of each block "
                          "per backward pass "
                          "(default auto: on for SDXL on a GPU, off otherwise)")
    how.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")

    out = erase.add_argument_group("outputs (at least one of --erasure, --lora, --bake)")
    out.add_argument("--erasure", metavar="OUT.safetensors", help="write the ACE erasure (gated, exact)")
    out.add_argument("--lora", metavar="OUT.safetensors",
                     help="write the portable LoRA (kohya keys, gate fixed open: it also shifts unrelated prompts a little)")
    out.add_argument("--lora-rank", type=int, metavar="R",
                     help="compress the LoRA: the edits of all concepts together to rank R (SVD; the error is printed). "
                          "Default: exact, each concept's rank side by side")
    out.add_argument("--bake", metavar="OUT.safetensors",
                     help="write the whole erased checkpoint, the erasure baked into its weights (gate open, as the "
                          "LoRA), as ComfyUI's Save Checkpoint writes it")
    out.add_argument("--overwrite", action="store_true", help="replace output files that already exist")

    ev = erase.add_argument_group("evaluation (optional)")
    ev.add_argument("--eval", metavar="PROMPTS.json", help="render these prompts before and after (format below)")
    ev.add_argument("--eval-dir", metavar="DIR", help="where the evaluation's images and eval.json go (created if missing)")
    ev.add_argument("--sample-steps", type=int, metavar="N", help="sampling steps per render (default 20)")
    ev.add_argument("--cfg", type=float, help="classifier-free guidance (default 7, 3 for the toy model)")
    ev.add_argument("--sampler", metavar="NAME", help="a ComfyUI sampler name (default euler)")
    ev.add_argument("--scheduler", metavar="NAME", help="a ComfyUI scheduler name (default normal, karras for the toy model)")

    erase.add_argument("--verbose", action="store_true", help="show ComfyUI's own log messages")
    return parser


@dataclass
class Plan:
    """The checked arguments of `erase`."""

    checkpoint: Path | None  # None: the toy model
    toy: str | None  # which toy model, when there is no checkpoint
    model_name: str
    preset: str  # a preset's name, or NO_PRESET
    concepts: str  # the concept list, checked by the pack's parser once ComfyUI is up
    anchor: str
    preserve: str
    erasure_path: Path | None
    lora_path: Path | None
    bake_path: Path | None
    eval_prompts: dict | None  # {"erase": [...], "keep": [...], "negative": str}
    eval_dir: Path | None


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _concept_text(args) -> str:
    if args.concepts is None and args.concepts_file is None:
        if args.preset is None:
            raise CommandError("nothing to erase: give --preset, --concepts or --concepts-file")
        return ""
    if args.concepts is not None:
        return args.concepts.replace("\\n", "\n")
    path = Path(args.concepts_file)
    if not path.is_file():
        raise CommandError(f"--concepts-file {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"--concepts-file {path} cannot be read as text ({_one_line(e)})") from None


def _output_path(option: str, value: str, overwrite: bool, taken: dict[str, Path]) -> Path:
    path = Path(value)
    if path.suffix != OUTPUT_SUFFIX:
        raise CommandError(f"{option} {value}: the file name must end in {OUTPUT_SUFFIX}")
    for other, other_path in taken.items():
        if path.resolve() == other_path.resolve():
            raise CommandError(f"{option} {value} is the same file as {other}")
    folder = path.parent
    if not folder.is_dir():
        raise CommandError(f"{option} {value}: the folder '{folder}' does not exist; create it first")
    if path.is_dir():
        raise CommandError(f"{option} {value} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CommandError(f"{option} {value} already exists; pass --overwrite to replace it")
    taken[option] = path
    return path


def read_prompt_file(path: Path) -> dict:
    """The evaluation prompts: {"erase": [...], "keep": [...], "negative": "..."} (see --help)."""
    where = f"--eval {path}"
    if not path.is_file():
        raise CommandError(f"{where}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"{where} is not a readable JSON file ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise CommandError(f'{where}: expected a JSON object like {{"erase": [...], "keep": [...]}}')
    unknown = sorted(set(data) - {"erase", "keep", "negative"})
    if unknown:
        raise CommandError(f"{where}: unknown key '{unknown[0]}'; the keys are \"erase\", \"keep\" and \"negative\"")
    prompts = {}
    for group in ("erase", "keep"):
        value = data.get(group, [])
        if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
            raise CommandError(f'{where}: "{group}" must be a list of non-empty prompts')
        prompts[group] = [p.strip() for p in value]
    if not prompts["erase"] and not prompts["keep"]:
        raise CommandError(f'{where} has no prompts: give "erase" and/or "keep" prompts')
    negative = data.get("negative", "")
    if not isinstance(negative, str):
        raise CommandError(f'{where}: "negative" must be text')
    prompts["negative"] = negative
    return prompts


def eval_rows(prompts: dict) -> list[tuple[str, int, str]]:
    """(group, number from 1, prompt) for every evaluation prompt, erase prompts first."""
    return [(group, i, text) for group in ("erase", "keep") for i, text in enumerate(prompts[group], 1)]


def eval_files(prompts: dict) -> list[str]:
    """The files an evaluation writes into its folder."""
    names = [f"{g}-{i:02d}-{which}.png" for g, i, _ in eval_rows(prompts) for which in ("base", "erased")]
    return [*names, "grid.png", "eval.json"]


def check_args(args) -> Plan:
    """Every check that needs neither torch nor ComfyUI, so that mistakes fail at once."""
    if (args.toy is not None) == (args.checkpoint is not None):
        raise CommandError("give either a checkpoint file or --toy")
    checkpoint = None
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.exists():
            raise CommandError(f"checkpoint not found: {checkpoint}")
        if not checkpoint.is_file():
            raise CommandError(f"{checkpoint} is a folder, not a checkpoint file")

    concepts = _concept_text(args)
    for option, value, low, high in (("--steps", args.steps, 0, 100_000), ("--rank", args.rank, 1, 256),
                                     ("--seed", args.seed, 0, MAX_SEED), ("--threads", args.threads, 1, 1024),
                                     ("--sample-steps", args.sample_steps, 1, 10_000), ("--lora-rank", args.lora_rank, 1, 1024)):
        if value is not None and not low <= value <= high:
            raise CommandError(f"{option} must be from {low} to {high}, got {value}")
    if args.resolution is not None and not (8 <= args.resolution <= 16384 and args.resolution % 8 == 0):
        raise CommandError(f"--resolution must be a multiple of 8 from 8 to 16384, got {args.resolution}")
    for option, value in (("--strength", args.strength), ("--cfg", args.cfg)):
        if value is not None and not math.isfinite(value):
            raise CommandError(f"{option} must be a finite number, got {value}")

    if args.erasure is None and args.lora is None and args.bake is None:
        raise CommandError("nothing to write: give --erasure, --lora and/or --bake OUT.safetensors")
    if args.lora_rank is not None and args.lora is None:
        raise CommandError("--lora-rank sets the rank of the LoRA: give --lora OUT.safetensors too")
    if args.bake is not None and checkpoint is None:
        raise CommandError("--bake writes a checkpoint: give a checkpoint file to erase from, not --toy")
    taken = {"the checkpoint": checkpoint} if checkpoint is not None else {}
    erasure_path = _output_path("--erasure", args.erasure, args.overwrite, taken) if args.erasure else None
    lora_path = _output_path("--lora", args.lora, args.overwrite, taken) if args.lora else None
    bake_path = _output_path("--bake", args.bake, args.overwrite, taken) if args.bake else None

    prompts = eval_dir = None
    if (args.eval is None) != (args.eval_dir is None):
        raise CommandError("--eval PROMPTS.json and --eval-dir DIR go together")
    if args.eval is not None:
        prompts = read_prompt_file(Path(args.eval))
        eval_dir = Path(args.eval_dir)
        if eval_dir.exists() and not eval_dir.is_dir():
            raise CommandError(f"--eval-dir {eval_dir} is a file, not a folder")
        if not eval_dir.exists() and not eval_dir.parent.is_dir():
            raise CommandError(f"--eval-dir {eval_dir}: the folder '{eval_dir.parent}' does not exist; create it first")
        existing = [name for name in eval_files(prompts) if (eval_dir / name).exists()]
        if existing and not args.overwrite:
            raise CommandError(f"--eval-dir {eval_dir} already holds {existing[0]}; pass --overwrite to replace it")
    name = f"'{checkpoint.name}'" if checkpoint is not None else f"the {args.toy} toy model"
    return Plan(checkpoint, args.toy, name, args.preset or NO_PRESET, concepts, args.anchor, args.preserve.replace("\\n", "\n"),
                erasure_path, lora_path, bake_path, prompts, eval_dir)


# --- the work ---------------------------------------------------------------------------------------

def start_comfy(device: str, threads: int | None, verbose: bool):
    """ComfyUI in this process with this pack, on the asked device, its log quiet unless --verbose;
    returns the pack."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first touches CUDA
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        pack = host.start(device=device, quiet=not verbose)
    except (host.ComfyUINotFound, host.HostError) as e:
        raise CommandError(_one_line(e)) from None
    if not verbose:
        logging.getLogger().setLevel(logging.ERROR)
    return pack


def sampler_settings(args, toy_model: bool) -> dict:
    """Sampling settings of the evaluation renders, checked against ComfyUI's lists."""
    import comfy.samplers

    defaults = toy.SAMPLER if toy_model else CHECKPOINT_SAMPLER
    settings = {
        "sampler_name": args.sampler or defaults["sampler_name"],
        "scheduler": args.scheduler or defaults["scheduler"],
        "steps": args.sample_steps or defaults["steps"],
        "cfg": args.cfg if args.cfg is not None else defaults["cfg"],
        "seed": args.seed,
    }
    for option, key, known in (("--sampler", "sampler_name", comfy.samplers.KSampler.SAMPLERS),
                               ("--scheduler", "scheduler", comfy.samplers.KSampler.SCHEDULERS)):
        if settings[key] not in known:
            raise CommandError(f"{option} {settings[key]}: ComfyUI has no such {option[2:]}; it has {', '.join(known)}")
    return settings


def load_model(pack, plan: Plan, need_vae: bool):
    """(MODEL, CLIP, VAE) through ComfyUI's checkpoint loader, or a toy model."""
    if plan.checkpoint is None:
        try:
            return pack.toy.model.load_toy_model(plan.toy)
        except (RuntimeError, FileNotFoundError) as e:
            raise CommandError(f"the toy model cannot be loaded: {_one_line(e)}") from None
    import comfy.sd

    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(plan.checkpoint), output_vae=need_vae, output_clip=True, embedding_directory=None)
    except Exception as e:  # noqa: BLE001  ComfyUI's loader raises any kind of error on a bad file
        if "Could not detect model type" in str(e):
            raise CommandError(f"{plan.model_name} is not a checkpoint ComfyUI recognises: no diffusion model "
                               "it knows is in it") from None
        # The first sentence of the loader's message, e.g. "Error while deserializing header: ..."
        detail = _one_line(str(e).strip().splitlines()[0] if str(e).strip() else "").split(". ")[0][:160]
        raise CommandError(f"{plan.model_name} cannot be loaded: the file is corrupted or not a model file "
                           f"({type(e).__name__}{': ' + detail if detail else ''})") from None
    return model, clip, vae


@contextlib.contextmanager
def progress_bar(description: str):
    """A tqdm bar driven by ComfyUI's progress hook, which the nodes' stage 2 updates every step."""
    import comfy.utils
    from tqdm import tqdm

    bar = None

    def hook(value, total, preview, node_id=None):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.total = total
        bar.update(value - bar.n)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        if bar is not None:
            bar.close()


def _write(path: Path, save) -> None:
    """save(file) into a temporary name next to `path`, then renamed: never a half-written output."""
    partial = path.with_name(path.name + ".partial")
    try:
        save(str(partial))
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def run_erase(args, plan: Plan) -> None:
    pack = start_comfy(args.device, args.threads, args.verbose)
    ace, comfy_models = pack.ace, pack.nodes.comfy_models
    try:
        request = ace.presets.request_with_preset(plan.preset, plan.concepts, plan.anchor, plan.preserve)
    except ace.concepts.ConceptError as e:
        raise CommandError(f"concept list: {_one_line(e)}") from None
    try:
        closed_form = ace.closed_form.ClosedFormConfig(rank=args.rank)
        training = ace.finetune.FinetuneConfig(steps=args.steps, seed=args.seed)
        expansion = ace.expansion.ExpansionConfig(enabled=not args.no_expand)
        strength = ace.adapter.check_strength(args.strength)
    except ValueError as e:
        raise CommandError(_one_line(e)) from None
    settings = sampler_settings(args, toy_model=plan.checkpoint is None) if plan.eval_prompts is not None else None

    print(f"loading {plan.model_name}", flush=True)
    model, clip, vae = load_model(pack, plan, need_vae=plan.eval_prompts is not None or plan.bake_path is not None)
    try:
        projections = comfy_models.check_model(model, plan.model_name)
    except ace.families.UnsupportedModelError as e:
        raise CommandError(_one_line(e)) from None
    if clip is None:
        raise CommandError(f"{plan.model_name} holds no text encoder (CLIP); ACE needs the one the model was "
                           "trained with: use a full checkpoint, not a diffusion-model-only file")
    family = comfy_models.family_of(model)
    resolution = args.resolution or comfy_models.DEFAULT_RESOLUTION.get(family, 512)
    try:
        compute = comfy_models.training_compute(model, args.precision, args.checkpointing)
    except ValueError as e:
        raise CommandError(_one_line(e)) from None
    print(f"{plan.model_name}: {family}, {len(projections)} cross-attention projections; erasing "
          f"{len(request.concepts)} concept(s): {', '.join(c.target for c in request.concepts)}", flush=True)

    if args.steps and model.load_device.type == "cpu" and plan.checkpoint is not None:
        print("note: fine-tuning on the CPU; a real SD checkpoint takes minutes per step (--steps 0 is the "
              "closed form alone, seconds per concept)", flush=True)
    stage2 = (f", then {args.steps} fine-tuning steps (stage 2: {compute.precision}, gradient checkpointing "
              f"{'on' if compute.checkpointing else 'off'})") if args.steps else ""
    print(f"encoding the concepts' prompts and solving the closed form (stages 0-1){stage2}", flush=True)
    started = time.perf_counter()
    try:
        with progress_bar("stage 2, adversarial fine-tuning"):
            erasure = pack.nodes.erase.erase_from_model(model, clip, request, closed_form, training, resolution,
                                                        expansion, compute)
    except ValueError as e:  # the nodes' errors are ValueErrors that say what to change
        raise CommandError(_one_line(e)) from None
    info = erasure.info
    info["model"] = plan.checkpoint.name if plan.checkpoint is not None else f"{plan.toy} toy model"
    line = f"erased in {time.perf_counter() - started:.1f} s: closed form {info['stage1_seconds']:.1f} s"
    if info.get("history"):
        losses = ", ".join(f"{k} {v:.4g}" for k, v in info["history"][-1].items())
        line += f", fine-tuning {info['stage2_seconds']:.1f} s (last step's losses: {losses})"
    print(line, flush=True)
    print(pack.nodes.erase.found_words(erasure), flush=True)

    if plan.erasure_path is not None:
        _write(plan.erasure_path, lambda f: ace.files.save_erasure(erasure, f))
        print(f"wrote the erasure {plan.erasure_path} ({_size(plan.erasure_path)})", flush=True)
    if plan.lora_path is not None:
        exported = []
        _write(plan.lora_path, lambda f: exported.append(ace.files.export_lora(erasure, f, strength, args.lora_rank)))
        lora = exported[0]
        error = (f", {lora.max_error:.2%} from the erasure with its gate open at most (mean {lora.mean_error:.2%})"
                 if lora.max_error else ", exact")
        print(f"wrote the LoRA {plan.lora_path} ({_size(plan.lora_path)}, rank {lora.rank}{error})", flush=True)
    if plan.bake_path is not None:
        import comfy.sd

        baked_model = comfy_models.baked(comfy_models.with_erasure(model, erasure, strength))
        metadata = {"ace_baked_erasure": json.dumps(erasure.request.to_json()), "ace_strength": str(strength)}
        _write(plan.bake_path, lambda f: comfy.sd.save_checkpoint(f, baked_model, clip, vae, metadata=metadata))
        print(f"wrote the erased checkpoint {plan.bake_path} ({_size(plan.bake_path)})", flush=True)

    if plan.eval_prompts is not None:
        erased_model = comfy_models.with_erasure(model, erasure, strength)
        latent = comfy_models.latent_shape(model, resolution)
        report = evaluate(model, erased_model, clip, vae, erasure, plan.eval_prompts, plan.eval_dir,
                          dict(settings, resolution=resolution), latent)
        report["strength"] = strength
        (plan.eval_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(format_table(report["prompts"], report["summary"]))
        print(f"wrote {plan.eval_dir / 'eval.json'}, {plan.eval_dir / 'grid.png'} and "
              f"{2 * len(report['prompts'])} images", flush=True)


def release_models() -> None:
    """Free ComfyUI's models now, while its modules are alive: at interpreter exit, ModelPatcher's
    __del__ finds them half torn down and prints errors."""
    gc.collect()
    model_management = sys.modules.get("comfy.model_management")
    if model_management is not None:
        model_management.unload_all_models()
        gc.collect()


# --- evaluation ----------------------------------------------------------------------------------

def evaluate(model, erased_model, clip, vae, erasure, prompts: dict, out_dir: Path, settings: dict,
             latent_shape: tuple) -> dict:
    """Render every prompt through the base and the erased model (same seed and noise), save the
    images and a before/after grid; return what eval.json holds."""
    rows = eval_rows(prompts)
    conditioning = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for _, _, text in rows]
    renders = render_pairs(model, erased_model, clip, vae, conditioning, prompts["negative"], settings, latent_shape)
    out_dir.mkdir(exist_ok=True)
    results = []
    for (group, number, text), cond, (base, erased) in zip(rows, conditioning, renders):
        files = {}
        for which, (_, image) in (("base", base), ("erased", erased)):
            files[which] = f"{group}-{number:02d}-{which}.png"
            to_image(image).save(out_dir / files[which])
        results.append({"group": group, "prompt": text, **gate_on(erasure, cond),
                        "latent_change": round(float((erased[0] - base[0]).abs().mean()), 5),
                        "image_change": round(float((erased[1] - base[1]).abs().mean()), 5),
                        "base_image": files["base"], "erased_image": files["erased"]})
    grid([Row([f"{r['group']}: {r['prompt']}", f"gate {r['gate_max']:.2f} ({r['gate_concept']})"],
              [[base[1]], [erased[1]]]) for r, (base, erased) in zip(results, renders)],
         ["base", "erased"], cell=256, label_width=420).save(out_dir / "grid.png")
    summary = {}
    for group in ("erase", "keep"):
        mine = [r for r in results if r["group"] == group]
        if mine:
            summary[group] = {"prompts": len(mine)} | {
                key: round(sum(r[key] for r in mine) / len(mine), 5) for key in ("gate_max", "latent_change", "image_change")
            }
    return {"model": erasure.info.get("model"), "family": erasure.family,
            "concepts": [c.target for c in erasure.request.concepts],
            "sampling": dict(settings, negative=prompts["negative"]), "prompts": results, "summary": summary}


def render_pairs(model, erased_model, clip, vae, conditioning: list, negative: str, settings: dict,
                 latent_shape: tuple) -> list:
    """Per prompt, ((latent, image) of the base model, (latent, image) of the erased model), each
    sampled with ComfyUI's sampler from the same seed and noise."""
    import comfy.sample
    import torch
    from tqdm import tqdm

    negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros((1, *latent_shape))
    noise = comfy.sample.prepare_noise(latent, settings["seed"])
    renders = {"base": [], "erased": []}
    with tqdm(total=2 * len(conditioning), desc="evaluation renders", unit="image", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for which, m in (("base", model), ("erased", erased_model)):
            for cond in conditioning:
                out = comfy.sample.sample(m, noise, settings["steps"], settings["cfg"], settings["sampler_name"],
                                          settings["scheduler"], cond, negative, latent, disable_pbar=True,
                                          seed=settings["seed"])
                image = vae.decode(out)[..., :3].float().cpu().clamp(0, 1)
                renders[which].append((out.float().cpu(), image.reshape(image.shape[-3:])))
                bar.update(1)
    return list(zip(renders["base"], renders["erased"]))


def gate_on(erasure, conditioning) -> dict:
    """The largest gate of the erasure on every token the UNet's cross-attention receives for a
    prompt, and the concept it belongs to."""
    import torch

    with torch.no_grad():
        gates = torch.cat([erasure.adapter.gate(c[0].float().cpu()).flatten(0, -2) for c in conditioning])
    best = gates.max(dim=0).values
    return {"gate_max": round(float(best.max()), 4), "gate_concept": erasure.gate_names()[int(best.argmax())]}


def format_table(results: list[dict], summary: dict) -> str:
    lines = [f"{'group':6} {'gate':>5} {'Δimage':>8} {'Δlatent':>8}  prompt"]
    for r in results:
        lines.append(f"{r['group']:6} {r['gate_max']:5.2f} {r['image_change']:8.4f} {r['latent_change']:8.4f}  {r['prompt']}")
    for group, s in summary.items():
        lines.append(f"{'mean ' + group:>12}: gate {s['gate_max']:.2f}, Δimage {s['image_change']:.4f}, "
                     f"Δlatent {s['latent_change']:.4f} ({s['prompts']} prompts)")
    return "\n".join(lines)


# --- entry ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = check_args(args)
        run_erase(args, plan)
    except CommandError as e:
        print(f"ace {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ace {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_models()
    return 0
