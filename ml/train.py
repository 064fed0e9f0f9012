"""Train the malaria VGG19 classifier on a Parasitized/Uninfected folder, split by patient group.

    python -m ml.split --data ../shared/datasets/nih-malaria-cells --out /tmp/malaria-split
    python -m ml.train --data /tmp/malaria-split/train --out /tmp/malaria_vgg19.safetensors

trains on the split's train side (its validation patients are drawn from those), keeping the test
side's patients for ml.evaluate and the shipped model in ml/weights/ as it is.

``--init scratch`` trains the whole VGG19-BN; ``--init imagenet`` loads torchvision's ImageNet VGG19,
freezes its convolutional trunk and trains only the new two-way head (the seed's method);
``--init-from FILE`` starts from an earlier model file of the same architecture, usually at a larger
``--input-size`` (progressive resizing: most epochs run cheaply at low resolution, a few at the
resolution that shows small ring-stage parasites). ``--refit FILE`` repeats the run that wrote FILE on
all of DATA, validation patients included, and keeps FILE's validation-chosen threshold: more patients
to learn from once the recipe, epoch count and threshold have been chosen. ``--device cuda`` trains on
a GPU (the shipped model's recipe; see ml/MODEL_CARD.md) with the same seed-driven order and
augmentations.
"""

import argparse
import copy
import hashlib
import json
import pickle
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ml.augment import augment_batch
from ml.data import Sample, at_least_one, fraction, list_samples, load_arrays, patient_groups, split_by_patient
from ml.metrics import choose_threshold, screening_metrics
from ml.model import CLASS_NAMES, MIN_HEATMAP_GRID, PARASITIZED, MalariaVGG, ModelConfig
from ml.predictor import cpu_has_bf16
from ml.tensors import model_inputs
from ml.weights import ModelInfo, load_model, read_info, save_model, tensors_that_differ

IMAGENET_VGG19_FILE = "vgg19-dcbb9e9d.pth"


# A refit repeats the run it refits: the same options, so the same schedule (see check_same_recipe).
REFIT_MUST_MATCH = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "label_smoothing",
    "mixup",
    "ema",
    "seed",
    "init_from",
    "exclude",
    "limit",
)
# A run resumed with any of these changed would continue another schedule, data set or recipe.
RESUME_MUST_MATCH = (  # and the cells themselves (cells_digest), wherever --data finds them
    "init",
    "init_from",
    "input_size",
    "trunk_stride",
    "stain_standardise",
    "label_smoothing",
    "mixup",
    "ema",
    "exclude",
    "refit",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "val_fraction",
    "min_sensitivity",
    "limit",
    "seed",
    "bf16",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument(
        "--out", required=True, help="model file to write: the best validation AUC's epoch (with --refit: FILE's)"
    )
    parser.add_argument("--init", choices=("scratch", "imagenet"), default="scratch")
    parser.add_argument("--backbone-weights", help="torchvision VGG19 ImageNet state dict (.pth or .safetensors)")
    parser.add_argument("--init-from", help="model file (from ml.train) whose weights to continue training")
    parser.add_argument("--input-size", type=int, help="default 64 (scratch) or 128 (imagenet)")
    parser.add_argument("--trunk-stride", type=int, choices=(8, 16, 32), help="default 8 (scratch) or 16 (imagenet)")
    parser.add_argument(
        "--stain-standardise",
        action="store_true",
        help="scale each cell to a reference mean colour (recorded in the model file); adds hue jitter",
    )
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="e.g. 0.1 when some labels are wrong")
    parser.add_argument(
        "--mixup",
        type=float,
        metavar="ALPHA",
        help="blend each training cell with another, in a Beta(ALPHA, ALPHA) share (e.g. 0.2); softens wrong labels",
    )
    parser.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="validate and export an exponential moving average of the weights (e.g. 0.998 per step)",
    )
    parser.add_argument(
        "--exclude",
        metavar="FILE",
        help="cells to leave out of training (not validation): an ml.audit --json report or one name per line",
    )
    parser.add_argument(
        "--refit",
        metavar="FILE",
        help="train on every patient group in DATA (no validation split), keeping the threshold and "
        "validation figures of FILE, an earlier run of the same recipe",
    )
    parser.add_argument("--epochs", type=at_least_one, default=8)
    parser.add_argument("--batch-size", type=at_least_one, default=64)
    parser.add_argument("--lr", type=float, help="peak learning rate; default 2e-3 scratch, 1e-2 imagenet")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--val-fraction", type=fraction, default=0.12, help="fraction of patient groups for validation")
    parser.add_argument("--min-sensitivity", type=sensitivity, default=0.97, help="sensitivity the threshold must keep")
    parser.add_argument("--limit", type=at_least_one, help="use at most this many images (smoke tests)")
    parser.add_argument(
        "--threads", type=at_least_one, default=torch.get_num_threads(), help="CPU threads and decoders"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the network trains")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    parser.add_argument("--checkpoint", help="training-state file (default: OUT with .ckpt suffix)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--checkpoint-every", type=at_least_one, default=100, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=20261125)
    return parser.parse_args(argv)


def sensitivity(text: str) -> float:
    """An argparse type: a share of the parasitized cells above 0 and at most 1."""
    value = float(text)
    if not 0 < value <= 1:  # NaN too; at 0 any threshold keeps it, and screening is not asked for
        raise argparse.ArgumentTypeError(f"{text}: give a sensitivity above 0 and at most 1, e.g. 0.97")
    return value


def build_model(args) -> MalariaVGG:
    if args.init_from:
        return warm_start(args)
    imagenet = args.init == "imagenet"
    config = ModelConfig(
        arch="vgg19" if imagenet else "vgg19_bn",
        input_size=args.input_size or (128 if imagenet else 64),
        trunk_stride=args.trunk_stride or (16 if imagenet else 8),
        stain_standardise=args.stain_standardise,
    )
    model = MalariaVGG(config)
    if imagenet:
        trunk = imagenet_trunk_state(args.backbone_weights)
        wrong = tensors_that_differ(trunk, model.features.state_dict())
        if wrong:  # another network's file: load_state_dict's error would list every key
            raise ValueError(
                f"--backbone-weights: not torchvision's VGG19 without batch norm ({len(wrong)} tensors missing, "
                f"extra or of another shape, such as features.{wrong[0]})"
            )
        model.features.load_state_dict(trunk)
        model.freeze_trunk()
    return model


def warm_start(args) -> MalariaVGG:
    """The model in ``--init-from``, rebuilt for this run's input size (the weights do not depend on it)."""
    earlier, info = load_model(args.init_from)
    config = replace(
        info.config,
        input_size=args.input_size or info.config.input_size,
        trunk_stride=args.trunk_stride or info.config.trunk_stride,
        # Standardisation can be switched on for a continuation (batch norm adapts), never off.
        stain_standardise=args.stain_standardise or info.config.stain_standardise,
    )
    if config.trunk_stride != info.config.trunk_stride:
        raise SystemExit("--init-from keeps the earlier model's trunk stride; leave --trunk-stride out")
    model = MalariaVGG(config)
    model.load_state_dict(earlier.state_dict())
    print(f"starting from {info.version} at {config.input_size}px", flush=True)
    return model


def imagenet_trunk_state(path: str | None) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of torchvision's ImageNet VGG19, read without pickle."""
    source = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_VGG19_FILE
    if not source.is_file():
        raise SystemExit(
            f"ImageNet VGG19 weights not found at {source}. Pass --backbone-weights FILE, or place "
            f"torchvision's {IMAGENET_VGG19_FILE} in the torch hub cache."
        )
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(source))
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


def excluded_file_names(path: str) -> set[str]:
    """File names from an ``ml.audit --json`` report, or from a plain list (one per line, # comments)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"ml.train: --exclude: {error}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return {line for line in lines if line}
    if not isinstance(report, dict) or not isinstance(report.get("cells"), list):
        raise SystemExit(f"{path} is JSON but not an ml.audit --json report (no 'cells' list)")
    return {cell["file"] for cell in report["cells"]}


def train_one_epoch(
    model, optimizer, scheduler, images, labels, *, args, epoch, start_step, on_step, average=None, random_state=None
):
    """One epoch from ``start_step``. ``on_step(epoch, step, random_state)`` follows every step;
    passing that ``random_state`` back when resuming at that step continues the same augmentations
    and mixup draws an uninterrupted run would have made."""
    model.train()
    generator = torch.Generator().manual_seed(args.seed + epoch)
    mixing = np.random.default_rng(args.seed + epoch)
    order = torch.randperm(len(images), generator=generator)
    if random_state is not None:
        generator.set_state(random_state["torch"])
        mixing.bit_generator.state = random_state["numpy"]
    steps = len(order) // args.batch_size
    config = model.config
    started, seen = time.monotonic(), 0
    for step in range(start_step, steps):
        index = order[step * args.batch_size : (step + 1) * args.batch_size].to(images.device)
        # Standardisation undoes per-channel gain jitter, so hue shifts are the colour variation left.
        batch = augment_batch(images[index], generator, mix_channels=config.stain_standardise)
        inputs, targets = model_inputs(batch, config), labels[index]
        share, partner = 1.0, None
        if args.mixup:
            # Each cell is blended with another; the loss is blended by the same share.
            share = float(mixing.beta(args.mixup, args.mixup))
            partner = torch.randperm(len(index), generator=generator).to(images.device)
            inputs = share * inputs + (1 - share) * inputs[partner]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(inputs).float()
        loss = share * F.cross_entropy(logits, targets, label_smoothing=args.label_smoothing)
        if partner is not None:
            loss = loss + (1 - share) * F.cross_entropy(logits, targets[partner], label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(model)
        seen += len(index)
        if step % 20 == 0 or step == steps - 1:
            rate = seen / (time.monotonic() - started)
            eta = (steps - step - 1) * args.batch_size / rate
            print(
                f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {loss.item():.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s eta {eta / 60:.1f} min",
                flush=True,
            )
        on_step(epoch, step + 1, {"torch": generator.get_state(), "numpy": mixing.bit_generator.state})


def as_stored(model: MalariaVGG) -> MalariaVGG:
    """A copy of ``model`` with its weights rounded as the model file stores them (fp16)."""
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in stored.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return stored


@torch.inference_mode()
def evaluate(model, images, labels, *, bf16: bool, batch_size: int = 128) -> np.ndarray:
    """Probability of Parasitized for each image."""
    model.eval()
    config = model.config
    scores = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = model_inputs(batch, config)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        scores.append(logits.float().softmax(dim=1)[:, PARASITIZED])
    return torch.cat(scores).cpu().numpy()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_options(args)
    torch.set_num_threads(args.threads)
    device = training_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: let cuDNN pick its fastest kernels
    torch.manual_seed(args.seed)
    checkpoint_path = Path(args.checkpoint or Path(args.out).with_suffix(".ckpt"))

    if not args.resume and checkpoint_path.exists() and not finished_run(checkpoint_path):  # hours of work
        raise SystemExit(
            f"{checkpoint_path} holds an earlier run's checkpoint: add --resume to continue it, or remove it "
            "to start afresh"
        )

    samples, listed = read_samples(args)
    try:
        validation_run = read_info(args.refit) if args.refit else None
        # Built before the images are decoded: a wrong model file or size should not wait minutes to be said.
        model = build_model(args).to(device, memory_format=torch.channels_last)
    except (OSError, ValueError) as error:  # a missing or unreadable model file, an input size the trunk refuses
        raise SystemExit(f"ml.train: {error}") from None
    train_samples, val_samples, excluded = split_samples(samples, listed=listed, refit=bool(validation_run), args=args)
    check_heatmap_grid(model.config)
    last_epoch = check_same_recipe(model.config, validation_run, args=args) if validation_run else args.epochs
    size = model.config.input_size
    loaded = time.monotonic()
    train_x, train_y = (torch.from_numpy(a).to(device) for a in load_arrays(train_samples, size, workers=args.threads))
    val_x, val_y = (torch.from_numpy(a).to(device) for a in load_arrays(val_samples, size, workers=args.threads))
    train_x, val_x = (x.permute(0, 3, 1, 2).contiguous() for x in (train_x, val_x))
    print(f"decoded {len(train_x) + len(val_x)} images at {size}px in {time.monotonic() - loaded:.0f}s", flush=True)

    # The average keeps batch-norm statistics too (use_buffers), so it can be validated and exported as is.
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr or (1e-2 if args.init == "imagenet" else 2e-3)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, args.epochs * steps_per_epoch), pct_start=0.15
    )
    training = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "average": average}
    recipe = {name: getattr(args, name) for name in RESUME_MUST_MATCH} | {
        "cells": cells_digest([*train_samples, *val_samples], root=args.data)
    }
    state, resumed_random = {"epoch": 0, "step": 0, "best_auc": -1.0, "recipe": recipe}, None
    if args.resume:
        state, resumed_random = resume(checkpoint_path, recipe=recipe, **training)
    # Checked after the options are (a mistaken option says so first), before a minute is trained.
    check_training_cells(train_samples, val_samples, refit=bool(validation_run), args=args)

    def save_checkpoint(epoch: int, step: int, random_state: dict | None = None) -> None:
        state.update(epoch=epoch, step=step)
        if step % args.checkpoint_every == 0 or step == 0:
            write_checkpoint(checkpoint_path, progress=state, random_state=random_state, **training)

    # Validation scores as the worker will compute them, so that the epoch and the threshold are
    # chosen on its figures: on a CPU the worker uses bf16 only where it is native.
    validation_bf16 = device.type == "cpu" and cpu_has_bf16()
    for epoch in range(state["epoch"], last_epoch):
        train_one_epoch(
            model,
            optimizer,
            scheduler,
            train_x,
            train_y,
            args=args,
            epoch=epoch,
            start_step=state["step"],
            on_step=save_checkpoint,
            average=average,
            random_state=resumed_random,
        )
        resumed_random = None  # only the epoch the run was resumed in continues mid-way
        exported = average.module if average is not None else model
        record = dict(args=args, epoch=epoch + 1, train_samples=train_samples, excluded=excluded)
        if validation_run:
            if epoch + 1 == last_epoch:
                export(exported, validation=validation_run.metrics["validation"], refit_of=validation_run, **record)
        else:
            validate(exported, val_x, val_y, bf16=validation_bf16, state=state, val_samples=val_samples, **record)
        # The last epoch's checkpoint says the run ended: the next run to this file may start afresh.
        state["finished"] = epoch + 1 == last_epoch
        save_checkpoint(epoch + 1, 0)


def check_options(args) -> None:
    """Refuses options that cannot go together or hold no value argparse can check alone."""
    if args.mixup is not None and args.mixup <= 0:
        raise SystemExit(f"--mixup {args.mixup}: alpha must be above 0, e.g. 0.2")
    if args.ema is not None and not 0 < args.ema < 1:
        raise SystemExit(f"--ema {args.ema}: the decay must lie between 0 and 1, e.g. 0.998")
    # Either would be a run that is not the one asked for, with nothing to say so.
    if args.init_from and args.init == "imagenet":
        raise SystemExit("--init imagenet starts a new model, --init-from continues an earlier one: give one of them")
    if args.backbone_weights and args.init != "imagenet":
        raise SystemExit("--backbone-weights is read by --init imagenet only; add it, or leave the weights out")


def training_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: PyTorch sees no CUDA GPU on this machine; leave --device out to train on the CPU"
        )
    return device


def read_samples(args) -> tuple[list[Sample], set[str]]:
    """The cells of ``--data`` (at most ``--limit`` of them), and the stems ``--exclude`` lists."""
    try:
        samples = list_samples(args.data)
    except (OSError, ValueError) as error:  # a folder not of the shape --data asks for
        raise SystemExit(f"ml.train: {error}") from None
    listed = set()
    if args.exclude:
        # By stem: an audit of the PNG originals names the cells of their ml.compact .webp copy too.
        listed = {Path(name).stem for name in excluded_file_names(args.exclude)}
        if not any(s.path.stem in listed for s in samples):  # a list of another folder's cells
            raise SystemExit(f"--exclude: none of the {len(listed)} cells {args.exclude} lists is in {args.data}")
    if args.limit:
        samples = [samples[i] for i in np.random.default_rng(args.seed).permutation(len(samples))[: args.limit]]
    return samples, listed


def split_samples(
    samples: list[Sample], *, listed: set[str], refit: bool, args
) -> tuple[list[Sample], list[Sample], int]:
    """(training cells, validation cells, how many listed cells were left out of training)."""
    if refit:
        # The validation patients join training; the earlier run already chose the threshold on them.
        train_samples, val_samples = samples, []
    else:
        try:
            train_samples, val_samples = split_by_patient(samples, holdout_fraction=args.val_fraction, seed=args.seed)
        except ValueError as error:  # file names that do not name their patients
            raise SystemExit(f"ml.train: {error}") from None
    excluded = 0
    if args.exclude:
        kept = [s for s in train_samples if s.path.stem not in listed]
        excluded = len(train_samples) - len(kept)
        print(f"left {excluded} of {len(train_samples)} training cells out, as {args.exclude} lists", flush=True)
        train_samples = kept
    print(
        f"train: {len(train_samples)} images / {len(patient_groups(train_samples))} patient groups; "
        f"validation: {len(val_samples)} images / {len(patient_groups(val_samples))} groups",
        flush=True,
    )
    return train_samples, val_samples, excluded


def check_heatmap_grid(config: ModelConfig) -> None:
    grid, stride = config.heatmap_size, config.trunk_stride
    if grid < MIN_HEATMAP_GRID:
        raise SystemExit(
            f"--input-size {config.input_size} at trunk stride {stride} gives a {grid}x{grid} heatmap grid, "
            f"coarser than {MIN_HEATMAP_GRID}x{MIN_HEATMAP_GRID}: give --input-size {MIN_HEATMAP_GRID * stride} or more"
        )


def check_training_cells(train_samples: list[Sample], val_samples: list[Sample], *, refit: bool, args) -> None:
    if len(train_samples) < args.batch_size:  # not one step: the file would hold untrained weights
        raise SystemExit(f"{len(train_samples)} training images, fewer than --batch-size {args.batch_size}")
    if not val_samples and not refit:
        raise SystemExit("no patient group is left for validation, where the epoch and threshold are chosen")
    if val_samples and len({s.label for s in val_samples}) < 2:  # no AUC, and no threshold worth having
        only = CLASS_NAMES[val_samples[0].label]
        raise SystemExit(
            f"the validation patients' cells are all {only}; the epoch and threshold are chosen on both "
            "classes: give a larger --val-fraction or another --seed"
        )


def resume(checkpoint_path: Path, *, recipe: dict, model, optimizer, scheduler, average) -> tuple[dict, dict | None]:
    """Loads the run saved at ``checkpoint_path`` into the model, optimiser, scheduler and average;
    returns its progress, and the random state its epoch continues with (None at an epoch's start).
    A checkpoint of other settings or other cells is refused."""
    if not checkpoint_path.is_file():
        raise SystemExit(f"--resume: there is no checkpoint at {checkpoint_path}; leave --resume out to start afresh")
    saved = read_checkpoint(checkpoint_path)
    if saved is None:  # torch's own words advise unpickling it unsafely, so they are not repeated
        raise SystemExit(
            f"--resume: {checkpoint_path} is not a checkpoint ml.train can read (cut short, or another "
            "program's file); remove it to start afresh"
        )
    if "cells" not in saved["progress"].get("recipe", recipe):
        raise SystemExit(
            f"--resume: {checkpoint_path} is from an earlier ml.train, which recorded its data otherwise; "
            "leave --resume out to start afresh"
        )
    differ = sorted(k for k, v in saved["progress"].get("recipe", recipe).items() if recipe.get(k) != v)
    if differ:
        raise SystemExit(f"--resume: the checkpoint was made with other settings or data ({', '.join(differ)})")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if average is not None:
        average.load_state_dict(saved["average"])
    state = saved["progress"]
    print(f"resumed from {checkpoint_path} at epoch {state['epoch'] + 1} step {state['step']}", flush=True)
    return state, saved.get("random") if state["step"] else None


def write_checkpoint(
    checkpoint_path: Path, *, progress: dict, random_state: dict | None, model, optimizer, scheduler, average
) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": dict(progress),
        "random": random_state,
    }
    if average is not None:
        payload["average"] = average.state_dict()
    # Written whole, then renamed: a run stopped while writing keeps the last checkpoint.
    torch.save(payload, checkpoint_path.with_suffix(".tmp"))
    checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)


def validate(
    model, images, labels, *, args, epoch: int, bf16: bool, state: dict, train_samples, val_samples, excluded: int
) -> None:
    """Scores the validation patients after ``epoch``, choosing the threshold on them; the epoch
    whose AUC beats every earlier one's is exported."""
    scores = evaluate(as_stored(model), images, labels, bf16=bf16)
    positives = labels.cpu().numpy() == PARASITIZED
    threshold = choose_threshold(scores, positives, min_sensitivity=args.min_sensitivity)
    metrics = screening_metrics(scores, positives, threshold)
    print("validation " + json.dumps({k: v for k, v in metrics.items() if k != "confusion"}), flush=True)
    if np.isnan(metrics["auc"]):  # NaN weights: no AUC, and no probability is >= the threshold
        kept = f"; {args.out} keeps epoch {state['best_epoch']}" if state.get("best_epoch") else ""
        raise SystemExit(
            f"epoch {epoch}: validation scores are NaN (the weights diverged, or overflow the "
            f"file's fp16): try a lower --lr{kept}"
        )
    if metrics["auc"] > state["best_auc"]:
        state.update(best_auc=metrics["auc"], best_epoch=epoch)
        export(
            model,
            args=args,
            validation=metrics,
            epoch=epoch,
            train_samples=train_samples,
            excluded=excluded,
            val_samples=val_samples,
        )


def read_checkpoint(checkpoint_path: Path) -> dict | None:
    """The training state ml.train saved there, or None where the file is not one it can read."""
    try:
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("progress"), dict):
        return None
    return saved


def finished_run(checkpoint_path: Path) -> bool:
    """Whether the checkpoint is of a run that ended; one that cannot be read may be an interrupted one."""
    saved = read_checkpoint(checkpoint_path)
    return bool(saved and saved["progress"].get("finished"))


def check_same_recipe(config: ModelConfig, validation_run: ModelInfo, *, args) -> int:
    """A refit inherits its threshold from the validation run, which only holds for the same recipe:
    the same options and the same learning-rate schedule, stopped at the epoch that run chose.
    Returns that epoch."""
    if config != validation_run.config:
        raise SystemExit(f"--refit {validation_run.version} was {validation_run.config}; this run is {config}")
    chosen = validation_run.metrics.get("epoch")
    recipe = validation_run.metrics.get("recipe")
    if recipe is not None:
        this_run = refit_recipe(args)
        differ = [_as_option(k, v) for k, v in sorted(recipe.items()) if this_run.get(k) != v]
        if differ:
            raise SystemExit(f"--refit {validation_run.version} was trained {', '.join(differ)}; run it the same way")
        return chosen
    # Files written before the recipe was recorded: their schedule ended at the chosen epoch.
    if chosen != args.epochs:
        raise SystemExit(
            f"--refit {validation_run.version} was chosen at epoch {validation_run.metrics.get('epoch')}; "
            f"pass --epochs {validation_run.metrics.get('epoch')}"
        )
    return chosen


def cells_digest(samples: list[Sample], *, root: str | Path) -> str:
    """The cells a run learns from, by name and class: the same folder under another path matches;
    a cell added, removed or moved to the other class (relabelled after an audit) does not."""
    listing = sorted(f"{s.label} {s.path.relative_to(root).as_posix()}" for s in samples)
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


def refit_recipe(args) -> dict:
    """The options a refit must repeat; files by what they hold (a model's version, a digest of
    the excluded names), so the same files under another path still match."""
    recipe = {name: getattr(args, name) for name in REFIT_MUST_MATCH}
    if args.init_from:
        recipe["init_from"] = read_info(args.init_from).version
    if args.exclude:
        names = "\n".join(sorted(excluded_file_names(args.exclude)))
        recipe["exclude"] = "names-" + hashlib.sha256(names.encode()).hexdigest()[:12]
    return recipe


def _as_option(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return f"without {flag}" if value is None else f"with {flag} {value}"


def export(
    model,
    *,
    args,
    validation: dict,
    epoch: int,
    train_samples,
    excluded: int,
    val_samples=(),
    refit_of: ModelInfo | None = None,
) -> None:
    config = model.config
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().half().cpu().numpy().tobytes() if tensor.is_floating_point() else b"")
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    version = f"{config.arch}-{config.input_size}px-{stamp}-{digest.hexdigest()[:8]}"
    record = {
        "validation": validation,
        "epoch": epoch,
        "init": args.init,
        "init_from": read_info(args.init_from).version if args.init_from else None,
        "train_images": len(train_samples),
        "excluded_from_training": excluded,
        "train_groups": len(patient_groups(train_samples)),
        "validation_images": len(val_samples),
        "validation_groups": sorted(patient_groups(val_samples)),
        "seed": args.seed,
        "ema_decay": args.ema,
        "mixup_alpha": args.mixup,
        "recipe": refit_recipe(args),
    }
    if refit_of:
        # Validation figures and groups are the earlier run's; its validation patients are now trained on.
        record |= {
            "refit_of": refit_of.version,
            "validation_images": refit_of.metrics["validation_images"],
            "validation_groups": refit_of.metrics["validation_groups"],
        }
    info = ModelInfo(config=replace(config), version=version, threshold=validation["threshold"], metrics=record)
    save_model(model, args.out, info=info)
    print(f"wrote {args.out} ({version}, validation AUC {validation['auc']:.4f})", flush=True)


if __name__ == "__main__":
    main()
