"""What train_teacher.py and train_student.py share: options, device and precision, seeding, the
training loop with early stopping, Dice/IoU evaluation, checkpoints, parameter counts, progress."""
import argparse
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch

from data import BUSI_CLASSES, UserError, augment, load_data, make_splits, normalize
from losses import supervised_loss
from models import UNet

PROJECT = "busi-kd"  # marks this project's checkpoints
DEFAULT_DATA = os.path.join("data", "Dataset_BUSI_with_GT")


# ----------------------------------------------------------------------------- options

def parse_args(options, description, argv=None, positional=None):
    """argparse from a script's OPTIONS block: (name, default, help[, choices]) per option; a
    default that is a type (int, str) means "no default here": the option is None unless typed.
    positional: (name, help) of words that are no option (predict.py's input files).
    Returns (args, given): `given` is the set of options the user typed."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default, text, *choices in options:
        if isinstance(default, type):
            p.add_argument(f"--{name}", type=default, default=None, help=text)
        elif isinstance(default, bool):
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                           help=f"{text} (default: {default})")
        else:
            p.add_argument(f"--{name}", type=type(default), default=default, help=f"{text} (default: {default})",
                           choices=choices[0] if choices else None)
    if positional:
        p.add_argument(positional[0], nargs="*", help=positional[1])
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    given |= {g[3:] for g in given if g.startswith("no-")}
    return p.parse_args(argv), given


def choose_data(args, given, demo):
    """BUSI when it is at the default path (or wherever --data says), else the built-in phantom.
    On the phantom, the quick `demo` settings replace the defaults of options the user did not type."""
    if args.data == DEFAULT_DATA and not os.path.isdir(DEFAULT_DATA):
        args.data = "phantom"
        print(f"no BUSI at {DEFAULT_DATA}: using the built-in phantom; for BUSI put it there or pass --data PATH")
    if args.data == "phantom":
        changed = {k: v for k, v in demo.items() if k not in given}
        for k, v in changed.items():
            setattr(args, k, v)
        if changed:
            print("phantom quick-demo settings: " + ", ".join(f"--{k} {v}" for k, v in changed.items()))
    return args


def check_options(args):
    """Refuse numbers that would only fail later, with a traceback, as one-line errors now."""
    at_least = dict(size=16, width=1, epochs=1, patience=1, batch_size=1, folds=2, phantom_count=4)
    for k, lo in at_least.items():
        if getattr(args, k, lo) < lo:
            raise UserError(f"--{k} {getattr(args, k)}: must be at least {lo}")
    for k, ok, rule in (("lr", lambda v: v > 0, "above 0"), ("T", lambda v: v > 0, "above 0"),
                        ("alpha", lambda v: 0 <= v <= 1, "in [0, 1]"), ("dice_weight", lambda v: v >= 0, "0 or more"),
                        ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)")):
        if hasattr(args, k) and not ok(getattr(args, k)):
            raise UserError(f"--{k} {getattr(args, k)}: must be {rule}")
    if not 0 <= args.fold < args.folds:
        raise UserError(f"--fold {args.fold}: must be in 0..{args.folds - 1} for --folds {args.folds}")


def load_split_data(args):
    """Check the options, load the data they name, return (data, split of fold args.fold)."""
    check_options(args)
    classes = tuple(args.classes.split(","))
    if not set(classes) <= set(BUSI_CLASSES) or len(set(classes)) != len(classes):
        raise UserError(f"--classes {args.classes}: give distinct names from {','.join(BUSI_CLASSES)}")
    data = load_data(args.data, classes, args.size, args.phantom_count, args.data_seed)
    split = make_splits(data.labels, data.hashes, args.folds, args.data_seed, args.val_fraction)[args.fold]
    if not all(split.values()):
        raise UserError(f"--data {args.data}: {len(data)} images are too few for {args.folds} folds with a validation "
                        f"part; use more images or fewer --folds")
    counts = {c: data.labels.count(c) for c in dict.fromkeys(data.labels)}
    print(f"data: {args.data} ({data.source}), {len(data)} images "
          f"({', '.join(f'{n} {c}' for c, n in counts.items())}) at {args.size}x{args.size}; "
          f"fold {args.fold} of {args.folds}: {len(split['train'])} train, {len(split['val'])} val, {len(split['test'])} test")
    copies = len(data.hashes) - len(set(data.hashes))
    if data.merged or copies:
        print(f"data: masks merged for {data.merged} images with several mask files; {copies} exact duplicate "
              f"image(s), kept on the same side of the split as their copy")
    return data, split


# ----------------------------------------------------------------------------- device, precision, seeds

def pick_device(name="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:1 or mps") from None
        if (device.type == "cuda" and not torch.cuda.is_available()
                or device.type == "mps" and not torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: this machine has no {device.type} device; use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device, amp="auto"):
    """The autocast dtype, or None for plain fp32. auto: bf16 on GPUs that have it (else fp16 with a
    grad scaler); bf16 on CPUs with native bf16 (AVX512-BF16 / AMX: about 2-4x faster here); fp32
    on other CPUs (emulated bf16 is slower) and on MPS (not measured by us: try --amp fp16)."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators


def to_device(model, device):
    """channels_last (NHWC) suits the convolution kernels of GPUs and of oneDNN on CPUs."""
    return model.to(device, memory_format=torch.channels_last)


def maybe_compile(model, flag):
    """torch.compile(model) if asked: the returned callable shares the model's weights, so the
    checkpoint keeps plain state_dict keys."""
    return torch.compile(model) if flag else model


def batch(data_images, data_masks, idx, aug="none"):
    """Index a batch out of the uint8 tensors on the device, augment it, normalise it."""
    x, y = augment(data_images[idx].float() / 255, data_masks[idx], aug)
    return normalize(x).contiguous(memory_format=torch.channels_last), y


# ----------------------------------------------------------------------------- metrics

def dice_iou(pred, target):
    """Per-image Dice and IoU of binary masks (N, 1, H, W) -> two (N,) float tensors.
    Convention: an image whose mask and prediction are both empty scores 1 (nothing to find,
    nothing found); an empty mask with a non-empty prediction, or the reverse, scores 0."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    empty = total == 0
    dice = torch.where(empty, 1.0, 2 * inter / total.clamp(min=1))
    iou = torch.where(empty, 1.0, inter / (total - inter).clamp(min=1))
    return dice, iou


@torch.no_grad()
def evaluate(model, images, masks, indices, device, dtype, batch_size=32, dice_weight=0.0):
    """Supervised loss, per-image Dice and IoU (lesion probability >= 0.5) over every index: no
    image is dropped, the last batch may be smaller. Images are on the device already."""
    was_training = model.training
    model.eval()
    loss, dice, iou = 0.0, [], []
    for i in range(0, len(indices), batch_size):
        idx = torch.as_tensor(indices[i:i + batch_size], device=device)
        x, y = batch(images, masks, idx)
        with autocast(device, dtype):
            logits = model(x).float()
        loss = loss + supervised_loss(logits, y, dice_weight) * len(idx)
        d, j = dice_iou(logits.softmax(1)[:, 1:] >= 0.5, y)
        dice.append(d)
        iou.append(j)
    model.train(was_training)
    dice, iou = torch.cat(dice).cpu().numpy(), torch.cat(iou).cpu().numpy()
    return dict(loss=float(loss) / len(indices), dice=float(dice.mean()), dice_std=float(dice.std()),
                iou=float(iou.mean()), iou_std=float(iou.std()), per_image_dice=dice.tolist(),
                per_image_iou=iou.tolist())


# ----------------------------------------------------------------------------- training

def fit(model, images, masks, split, step, args, device, dtype, save, params=None):
    """Adam on `params` (default: the model's), early stopping on the validation loss.

    step(x, y) -> dict of scalar losses, "loss" being the one to minimise. After each epoch the
    validation loss (supervised, so teacher and student are judged alike) is computed; when it
    improves, save(epoch, val) writes the checkpoint, so the best one is on disk at all times.
    Stops after args.patience epochs without improvement, at args.epochs, on Ctrl-C (the best
    checkpoint stays), or on a non-finite loss (FloatingPointError; the best checkpoint stays).
    Returns (best_epoch, best_state, stopped): the model's best state_dict, and why training
    stopped: "early stop", "last epoch" or "interrupted".
    """
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    train_idx = torch.as_tensor(split["train"], device=device)
    best_loss, best_epoch, best_state, times, stopped = math.inf, 0, None, [], "last epoch"
    try:
        for epoch in range(1, args.epochs + 1):
            t0 = time.time()
            model.train()
            sums = {}
            for idx in train_idx[torch.randperm(len(train_idx), device=device)].split(args.batch_size):
                x, y = batch(images, masks, idx, args.aug)
                with autocast(device, dtype):
                    parts = step(x, y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"]).backward()
                scaler.step(opt)
                scaler.update()
                for k, v in parts.items():  # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(idx)
            train = {k: float(v) / len(train_idx) for k, v in sums.items()}
            if not math.isfinite(train["loss"]):
                raise FloatingPointError(
                    f"training loss became {train['loss']} at epoch {epoch}; "
                    + (f"best checkpoint (epoch {best_epoch}) kept" if best_epoch else "no checkpoint was saved")
                    + "; try a lower --lr or --amp off")
            val = evaluate(model, images, masks, split["val"], device, dtype, args.batch_size, args.dice_weight)
            if val["loss"] < best_loss:
                best_loss, best_epoch = val["loss"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save(epoch, val)
            times.append(time.time() - t0)
            per_epoch = sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]  # epoch 1 also warms up
            left = (args.epochs - epoch) * per_epoch
            comps = " ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
            print(f"epoch {epoch:3d}/{args.epochs} | train {train['loss']:.4f}" + (f" ({comps})" if comps else "")
                  + f" | val loss {val['loss']:.4f} dice {100 * val['dice']:.1f} | best {best_loss:.4f} @ {best_epoch}"
                  + f" | {times[-1]:.1f}s, at most {fmt_time(left)} left", flush=True)
            if epoch - best_epoch >= args.patience:
                print(f"early stop: no better validation loss for {args.patience} epochs")
                stopped = "early stop"
                break
    except KeyboardInterrupt:
        if best_state is None:
            raise
        print(f"\ninterrupted: going on with the best checkpoint (epoch {best_epoch})")
        stopped = "interrupted"
    return best_epoch, best_state, stopped


def fmt_time(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


def fmt_params(n):
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, ckpt):
    """Atomic: write a temporary file, then rename it over the old one, so a crash or Ctrl-C
    mid-write never leaves a broken checkpoint behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def make_checkpoint(kind, model, args, data, split, **extra):
    """All that rebuilds and judges the model: its class arguments and weights, the options, the
    split (image names per part, and a fingerprint of the data it was made on), versions."""
    return dict(project=PROJECT, kind=kind, model_config=dict(model.config),
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                args=vars(args), split={k: [data.names[i] for i in v] for k, v in split.items()},
                data_fingerprint=data.fingerprint(),
                versions=dict(torch=str(torch.__version__), numpy=np.__version__, python=platform.python_version()),
                **extra)


def load_checkpoint(path, kind, option="--teacher"):
    """Load a checkpoint made by this project's script for `kind` ("teacher", "student", or a tuple
    of both), or raise a one-line UserError."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    script = " or ".join(f"train_{k}.py" for k in kinds)
    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: file not found; train one with {script} first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{option} {path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                        f"train one with {script}") from None
    if not isinstance(ckpt, dict) or ckpt.get("project") != PROJECT:
        raise UserError(f"{option} {path}: not a checkpoint of this project; train one with {script}")
    if ckpt.get("kind") not in kinds:
        raise UserError(f"{option} {path}: a {ckpt.get('kind')} checkpoint, not a {' or '.join(kinds)}; "
                        f"give the file {script} wrote")
    return ckpt


def build_model(ckpt):
    """Rebuild the model of a checkpoint with its weights, in eval mode."""
    model = UNet(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


# ----------------------------------------------------------------------------- running a script

def run(main):
    """Run a script's main(): bad input -> 'error: ...' on one line and exit 2; a diverged run ->
    exit 1; Ctrl-C before any checkpoint -> exit 130. Never a traceback for these."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted before a checkpoint was saved", file=sys.stderr)
        sys.exit(130)
