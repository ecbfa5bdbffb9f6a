"""What train_teacher.py and train_student.py share: options, device and precision, seeding, the
training loop with early stopping, Dice/IoU evaluation, checkpoints, parameter counts, progress."""
import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np
import torch

from data import BUSI_CLASSES, UserError, augment, load_data, make_splits, near_duplicate_groups, normalize
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


AT_LEAST = dict(size=16, width=1, teacher_width=1, student_width=1, epochs=1, patience=1, batch_size=1, folds=2,
                phantom_count=4)  # the smallest value of each option that can work


def check_at_least(args):
    """--folds 1, --epochs 0 and the like: one-line errors now, not a traceback later."""
    for k, lo in AT_LEAST.items():
        if getattr(args, k, lo) < lo:
            raise UserError(f"--{k} {getattr(args, k)}: must be at least {lo}")


def check_options(args):
    """Refuse numbers that would only fail later, with a traceback, as one-line errors now."""
    check_at_least(args)
    for k, ok, rule in (("lr", lambda v: v > 0, "above 0"), ("T", lambda v: v > 0, "above 0"),
                        ("alpha", lambda v: 0 <= v <= 1, "in [0, 1]"), ("dice_weight", lambda v: v >= 0, "0 or more"),
                        ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"), ("warmup", lambda v: v >= 0, "0 or more"),
                        ("near_dup", lambda v: 0 <= v <= 1, "in [0, 1]")):
        if hasattr(args, k) and not ok(getattr(args, k)):
            raise UserError(f"--{k} {getattr(args, k)}: must be {rule}")
    if not 0 <= args.fold < args.folds:
        raise UserError(f"--fold {args.fold}: must be in 0..{args.folds - 1} for --folds {args.folds}")


def load_split_data(args):
    """Check the options, load the data they name, return (data, split of fold args.fold). The split
    is made from --data_seed, or read from the file --split names (see save_splits)."""
    check_options(args)
    classes = tuple(args.classes.split(","))
    if not set(classes) <= set(BUSI_CLASSES) or len(set(classes)) != len(classes):
        raise UserError(f"--classes {args.classes}: give distinct names from {','.join(BUSI_CLASSES)}")
    data = load_data(args.data, classes, args.size, args.phantom_count, args.data_seed)
    groups = near_duplicate_groups(data.thumbnails, data.hashes, args.near_dup)
    if getattr(args, "split", None):
        splits = load_splits(args.split, data, args.folds)
    else:
        splits = make_splits(data.labels, groups, args.folds, args.data_seed, args.val_fraction)
    split = splits[args.fold]
    if not all(split.values()):
        raise UserError(f"--data {args.data}: {len(data)} images are too few for {args.folds} folds with a validation "
                        f"part; use more images or fewer --folds")
    counts = {c: data.labels.count(c) for c in dict.fromkeys(data.labels)}
    print(f"data: {args.data} ({data.source}), {len(data)} images "
          f"({', '.join(f'{n} {c}' for c, n in counts.items())}) at {args.size}x{args.size}; "
          f"fold {args.fold} of {args.folds}: {len(split['train'])} train, {len(split['val'])} val, {len(split['test'])} test"
          + (f" (from {args.split})" if getattr(args, "split", None) else ""))
    copies = len(data.hashes) - len(set(data.hashes))
    if data.merged or copies:
        print(f"data: masks merged for {data.merged} images with several mask files; {copies} exact duplicate "
              f"image(s), kept on the same side of the split as their copy")
    near = len(data) - len(set(groups)) - copies
    if near and not getattr(args, "split", None):
        print(f"data: {near} near-copies (thumbnails correlating above --near_dup "
              f"{args.near_dup}) kept on the same side of the split as the image they copy")
    return data, splits


def only_class(split, data, cls):
    """The split restricted to the images of class `cls` (None: the whole split). A class teacher
    (T2KD) trains on these; the split itself stays the one made from every class."""
    if cls is None:
        return split
    if cls not in data.labels:
        raise UserError(f"--only_class {cls}: the data holds no {cls} images (classes: "
                        f"{', '.join(dict.fromkeys(data.labels))}); give one of those")
    return {part: [i for i in idx if data.labels[i] == cls] for part, idx in split.items()}


def save_splits(path, data, splits, seed, near_dup):
    """Write every fold's split as image names (JSON), with the seed, the near-copy threshold and the
    data's fingerprint, so that another model can be trained and tested on exactly the same parts."""
    write_json(path, dict(project=PROJECT, seed=seed, near_dup=near_dup, data_fingerprint=data.fingerprint(),
                          images=len(data),
                          folds=[{k: [data.names[i] for i in v] for k, v in s.items()} for s in splits]))


def load_splits(path, data, folds):
    """The splits of a file written by save_splits, as index lists into `data`; every image of the
    data must be in exactly one part of every fold, and the file must hold `folds` folds."""
    try:
        with open(path) as f:
            saved = json.load(f)
        parts = saved["folds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--split {path}: not a split file ({type(e).__name__}); write one with --save_split") from None
    if len(parts) != folds:
        raise UserError(f"--split {path}: holds {len(parts)} folds, not --folds {folds}; pass --folds {len(parts)}")
    index = {n: i for i, n in enumerate(data.names)}
    splits = []
    for fold in parts:
        names = [n for part in ("train", "val", "test") for n in fold.get(part, [])]
        unknown = [n for n in names if n not in index]
        if unknown or sorted(names) != sorted(index):
            what = f"{unknown[0]} is not in the data" if unknown else \
                f"{len(set(index) - set(names))} image(s) of the data are in no part, or some in two"
            raise UserError(f"--split {path}: does not match --data ({what}); use the data the split was made for")
        splits.append({part: sorted(index[n] for n in fold.get(part, [])) for part in ("train", "val", "test")})
    if saved.get("data_fingerprint") != data.fingerprint():
        print(f"note: --split {path} was made on images or masks with other pixels (same names), or at another "
              f"--size: another copy of the data?")
    return splits


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


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX; read from Linux's
    /proc/cpuinfo). PyTorch's own check is true on any AVX-512 CPU, where bf16 is emulated and slower
    than fp32; elsewhere (macOS, Windows) we cannot tell, and answer False."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def machine_name(device):
    """The processor a run ran on, for the records that come with timings: GPU name, or CPU model
    and whether it computes bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores" + (", native bf16" if device.type == "cpu" and cpu_has_native_bf16() else "")


def amp_dtype(device, amp="auto"):
    """The autocast dtype, or None for plain fp32. auto: bf16 where the hardware computes it natively,
    on GPUs of compute capability 8.0 or more (Ampere, Hopper) and on CPUs with AVX512-BF16 or AMX
    (about 3x faster than fp32 on those); fp16 with a grad scaler on older GPUs (V100, T4: bf16
    there is emulated); fp32 on other CPUs and on MPS (not measured by us: try --amp fp16)."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype, autocast=True):
    """How a run computes: "fp32", or "bf16 autocast" (training), or "bf16" (weights in bf16: predict.py)."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype] + " autocast" * autocast


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def run_seed(seed, fold):
    """The seed of one (fold, seed) run, drawn from both: every fold's seed s starts from weights of
    its own and sees a data stream of its own, so that 3 folds x 3 seeds are 9 independent
    replicates, not 3 initialisations seen three times. (A student and its teacher of the same
    fold and seed share it, and so do the student alone and the distilled one: that pairing is meant.)"""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


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


def data_generator(device, seed):
    """The random generator of a run's data stream: batch order and augmentation. It is its own,
    apart from torch's global one (which draws the initial weights), so that building any extra
    module (a regressor, a projector, a second teacher) never changes the batches a run sees:
    rows of a study differ only in what they distil. On a CUDA device it lives there (no copies)."""
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)


def batches(indices, batch_size, generator):
    """One epoch of shuffled batches of `indices` (a tensor on the data's device). A last batch of a
    single image joins the batch before it: BatchNorm cannot normalise one value per channel, which
    is what a 1x1 bottleneck (--size 16 to 31) would hand it."""
    order = torch.randperm(len(indices), generator=generator, device=generator.device).to(indices.device)
    chunks = list(indices[order].split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def batch(data_images, data_masks, idx, aug="none", generator=None):
    """Index a batch out of the uint8 tensors on the device, augment it, normalise it."""
    x, y = augment(data_images[idx].float() / 255, data_masks[idx], aug, generator)
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
        d, j = dice_iou(lesion_mask(logits), y)
        dice.append(d)
        iou.append(j)
    model.train(was_training)
    dice, iou = torch.cat(dice).cpu().numpy(), torch.cat(iou).cpu().numpy()
    return dict(loss=float(loss) / len(indices), dice=float(dice.mean()), dice_std=float(dice.std()),
                iou=float(iou.mean()), iou_std=float(iou.std()), per_image_dice=dice.tolist(),
                per_image_iou=iou.tolist())


# ----------------------------------------------------------------------------- training

def lr_factor(step, total, warmup, schedule):
    """The learning rate at optimiser step `step` (0-based) of `total`, as a share of the base rate.
    constant: 1 throughout (the paper). cosine: a linear warm-up over the first `warmup` steps, then
    half a cosine down to 0 at the last step: large steps while the weights are far from a good
    place, small ones to settle into it."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def steps_per_epoch(n_train, batch_size):
    """How many batches `batches` makes of n_train images (a last batch of one joins the one before)."""
    n = math.ceil(n_train / batch_size)
    return n - 1 if n > 1 and n_train - (n - 1) * batch_size == 1 else n


def fit(model, images, masks, split, step, *, device, dtype=None, extras=(), epochs=100, patience=20,
        batch_size=16, lr=1e-4, schedule="constant", warmup=0, select="loss", aug="strong", seed=0,
        dice_weight=0.0, state_path=None, resume=None, tag=None, generators=()):
    """Train `model` (and the `extras` that learn with it: a regressor, a projector) with Adam at a
    learning rate that follows `schedule` (lr_factor; `warmup` in epochs); keep the weights of the
    best validation epoch, by its supervised loss (select="loss", the paper) or its Dice ("dice").
    step(x, y, idx) -> dict of scalar losses, "loss" being the one minimised; idx are the batch's
    indices into the data (routing an image to the teacher of its class needs them).
    Stops after `patience` epochs without a better validation score, at `epochs`, on Ctrl-C (going
    on with the best weights), or on a non-finite loss (FloatingPointError). With `state_path`, the
    whole state is saved there after every epoch (save_state); `resume` is such a state, loaded.
    Returns dict(best_epoch, best_state, best_val, stopped, train_seconds, history)."""
    modules = [model, *extras]
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)
    per_epoch = steps_per_epoch(len(split["train"]), batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, epochs * per_epoch, warmup * per_epoch, schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    generator = data_generator(device, seed)
    train_idx = torch.as_tensor(split["train"], device=device)
    loop = dict(modules=modules, opt=opt, sched=sched, scaler=scaler, generators=[generator, *generators])
    run = load_state(resume, **loop) if resume is not None else new_run()
    stopped = "last epoch"
    try:
        for epoch in range(run["epoch"] + 1, epochs + 1):
            t0 = time.time()
            for m in modules:
                m.train()
            sums = {}
            for idx in batches(train_idx, batch_size, generator):
                x, y = batch(images, masks, idx, aug, generator)
                with autocast(device, dtype):
                    parts = step(x, y, idx)
                opt.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"]).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                for k, v in parts.items():  # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(idx)
            train = {k: float(v) / len(train_idx) for k, v in sums.items()}
            val = evaluate(model, images, masks, split["val"], device, dtype, batch_size, dice_weight)
            check_finite(train["loss"], val["loss"], epoch, run["epoch"], state_path)
            end_epoch(run, epoch, model, train, val, select, opt.param_groups[0]["lr"], time.time() - t0)
            if state_path:
                save_state(state_path, run, tag, **loop)
            print_epoch(run, epochs, train)
            if epoch - run["best_epoch"] >= patience:
                print(f"early stop: no better validation {select} for {patience} epochs")
                stopped = "early stop"
                break
    except KeyboardInterrupt:
        if run["best_state"] is None:
            raise
        print(f"\ninterrupted: going on with the best weights (epoch {run['best_epoch']})")
        stopped = "interrupted"
    return dict(best_epoch=run["best_epoch"], best_state=run["best_state"], best_val=run["best_val"],
                stopped=stopped, train_seconds=sum(run["seconds"]), history=run["history"])


def new_run():
    """The counters of a run that has not trained yet: the last epoch done, the best one so far
    (its score: lower is better), its weights and validation metrics, seconds and metrics per epoch."""
    return dict(epoch=0, best_score=math.inf, best_epoch=0, best_state=None, best_val=None, seconds=[], history=[])


def end_epoch(run, epoch, model, train, val, select, lr, seconds):
    """Book an epoch into `run`; keep the model's weights if its validation score is the best yet."""
    score = val["loss"] if select == "loss" else -val["dice"]
    if score < run["best_score"]:
        run.update(best_score=score, best_epoch=epoch, best_val=val,
                   best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    run["epoch"] = epoch
    run["seconds"].append(seconds)
    run["history"].append(dict(epoch=epoch, lr=lr, train_loss=train["loss"], val_loss=val["loss"], val_dice=val["dice"]))


def check_finite(train_loss, val_loss, epoch, saved_epoch, state_path):
    """A loss that became NaN or infinite ends the run with one line that says what is kept."""
    for what, loss in (("training", train_loss), ("validation", val_loss)):
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{what} loss became {loss} at epoch {epoch}; "
                + (f"the state after epoch {saved_epoch} is in {state_path}" if state_path and saved_epoch
                   else "nothing was saved") + "; try a lower --lr or --amp off")


def print_epoch(run, epochs, train):
    h, s = run["history"][-1], run["seconds"]
    left = (epochs - h["epoch"]) * (sum(s[1:]) / (len(s) - 1) if len(s) > 1 else s[0])  # epoch 1 also warms up
    comps = " ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
    best = run["best_val"]
    print(f"epoch {h['epoch']:3d}/{epochs} | lr {h['lr']:.1e} | train {train['loss']:.4f}" + (f" ({comps})" if comps else "")
          + f" | val loss {h['val_loss']:.4f} dice {100 * h['val_dice']:.1f} | best @ {run['best_epoch']} "
          + f"(loss {best['loss']:.4f} dice {100 * best['dice']:.1f}) | {s[-1]:.1f}s, at most {fmt_time(left)} left",
          flush=True)


def fmt_time(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


def fmt_params(n):
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """Write `path` through write(file): into a temporary file of a unique name in the same folder,
    flushed to disk (fsync), then renamed over `path`. A crash or Ctrl-C mid-write never leaves half
    a file, and two runs writing one path never share a temporary file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, ckpt):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def file_hash(path):
    """sha1 of a file's bytes: which exact checkpoint a result came from."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------- runs that survive

HOW_OPTIONS = {"device", "compile", "out", "resume", "data", "teacher", "class_teachers", "split", "save_split",
               "alone"}  # where files are, how fast it runs, what else is trained: not what this run computes


def run_tag(args, data, split, **more):
    """What makes two runs the same run: the options that decide the result (not where the files
    are or how fast it runs), the data's fingerprint, the split, and `more` (a student's teachers)."""
    return dict(options={k: v for k, v in sorted(vars(args).items()) if k not in HOW_OPTIONS},
                split={k: [data.names[i] for i in v] for k, v in split.items()},
                data_fingerprint=data.fingerprint(), **more)


def save_state(path, run, tag, modules, opt, sched, scaler, generators):
    """Write all that an unfinished run needs to go on as if never stopped: weights, optimiser,
    schedule, grad scaler, random generators (the data stream's first), the run's counters, and
    `tag`, what identifies the run. Atomic: a kill mid-write keeps the previous state."""
    save_checkpoint(path, dict(project=PROJECT, kind="state", tag=tag, run=run,
                               modules=[m.state_dict() for m in modules], optimizer=opt.state_dict(),
                               scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                               generator=generators[0].get_state(),
                               generators=[g.get_state() for g in generators[1:]]))


def load_state(state, modules, opt, sched, scaler, generators):
    """Put a state written by save_state back into a run's parts; returns the run's counters."""
    for m, s in zip(modules, state["modules"]):
        m.load_state_dict(s)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    generators[0].set_state(state["generator"])
    saved = state.get("generators", ())
    for g, s in zip(generators[1:], saved):
        g.set_state(s)
    if len(saved) < len(generators) - 1:  # a state saved before the step's generators were saved
        print(f"note: the saved state holds {len(saved)} of the step's {len(generators) - 1} random generators; "
              f"the others start afresh, so this run will not repeat an uninterrupted one exactly")
    run = state["run"]
    print(f"resumed after epoch {run['epoch']} (best @ {run['best_epoch']})")
    return run


def state_path(out):
    """Where an unfinished run keeps its state, beside its checkpoint: out/teacher.pt -> out/teacher.run.pt."""
    return out[:-3] + ".run.pt"


def resume_state(args, tag):
    """The saved state of an unfinished run to go on from (--resume), or None to start afresh."""
    path = state_path(args.out)
    if not args.resume:
        if os.path.isfile(path):
            print(f"note: {path} holds an unfinished run; starting afresh (add --resume to go on with it)")
        return None
    if not os.path.isfile(path):
        raise UserError(f"--resume: no unfinished run at {path}; run without --resume to start one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: {path} is not readable ({type(e).__name__}); run without --resume") from None
    old = state.get("tag") or {}
    if old != tag:
        o, n = old.get("options", {}), tag["options"]
        diff = ", ".join(f"--{k} {o.get(k)} (now {n.get(k)})" for k in sorted(o.keys() | n.keys()) if o.get(k) != n.get(k))
        raise UserError(f"--resume: {path} was made with {diff or 'other data, split or teachers'}; "
                        f"give the same options, or run without --resume to start afresh")
    return state


def finish(args, ckpt, stopped):
    """Write the finished checkpoint (only now: an unfinished run never replaces an older finished
    one), then drop the run's state, unless Ctrl-C stopped it: --resume can still go on then."""
    save_checkpoint(args.out, ckpt)
    if stopped != "interrupted" and os.path.isfile(state_path(args.out)):
        os.remove(state_path(args.out))


def lesion_mask(logits, threshold=0.5):
    """Where the lesion's softmax probability is at least `threshold`: (N, 2, H, W) -> (N, 1, H, W) bool."""
    return logits.float().softmax(dim=1)[:, 1:] >= threshold


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


# ----------------------------------------------------------------------------- timing

def sync(device):
    """Wait for the device's queued work, so a clock reading measures it (GPUs run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
