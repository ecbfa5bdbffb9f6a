"""What a careful command-line tool needs and a reader of the method does not: options and the
checks on them, the data and its split, the device, the precision and the seeds, checkpoints
written atomically, the state of an unfinished run and what identifies it (so that --resume goes
on with the same run), and bad input as one line. The scripts use it; kd.py, the distillation
chapter, does not."""
import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

from data import BUSI_CLASSES, UserError, hold_out, load_data, make_splits, near_duplicate_groups
from models import UNet


PROJECT = "busi-kd"  # marks this project's checkpoints
DEFAULT_DATA = os.path.join("data", "Dataset_BUSI_with_GT")


# ----------------------------------------------------------------------------- options

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script's docstring as written and shows each option's default (when it has one)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(description, defaults):
    """An ArgumentParser whose defaults are a script's DEFAULTS block (options without one are None)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.set_defaults(**defaults)
    return p


def choose_data(p, argv, args, demo):
    """BUSI when it is at the default path (or wherever --data says), else the built-in phantom.
    On the phantom the command line is read again with the quick `demo` settings as defaults: they
    replace the defaults of the options the user did not type. Returns the options to use."""
    if args.data == DEFAULT_DATA and not os.path.isdir(DEFAULT_DATA):
        args.data = "phantom"
        print(f"no BUSI at {DEFAULT_DATA}: using the built-in phantom; for BUSI put it there or pass --data PATH")
    if args.data != "phantom":
        return args
    p.set_defaults(**demo, data="phantom")
    demo_args = p.parse_args(argv)
    changed = {k: v for k, v in demo.items() if getattr(demo_args, k) == v != getattr(args, k)}
    if changed:
        print("phantom quick-demo settings: " + ", ".join(f"--{k} {v}" for k, v in changed.items()))
    return demo_args


AT_LEAST = dict(size=16, width=1, teacher_width=1, student_width=1, epochs=1, patience=1, batch_size=1, folds=2,
                phantom_count=4)  # the smallest value of each option that can work


def check_at_least(args):
    """--folds 1, --epochs 0 and the like: one-line errors now, not a traceback later."""
    for k, lo in AT_LEAST.items():
        lo = 1 if k == "folds" and getattr(args, "split", None) else lo  # a benchmark's one split is one fold
        if getattr(args, k, lo) < lo:
            raise UserError(f"--{k} {getattr(args, k)}: must be at least {lo}")


def check_options(args):
    """Refuse numbers that would only fail later, with a traceback, as one-line errors now."""
    check_at_least(args)
    for k, ok, rule in (("lr", lambda v: v > 0, "above 0"), ("T", lambda v: v > 0, "above 0"),
                        ("alpha", lambda v: 0 <= v <= 1, "in [0, 1]"), ("dice_weight", lambda v: v >= 0, "0 or more"),
                        ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"), ("warmup", lambda v: v >= 0, "0 or more"),
                        ("near_dup", lambda v: 0 <= v <= 1, "in [0, 1]"), ("data_seed", lambda v: v >= 0, "0 or more")):
        if hasattr(args, k) and not ok(getattr(args, k)):
            raise UserError(f"--{k} {getattr(args, k)}: must be {rule}")
    if not 0 <= args.fold < args.folds:
        raise UserError(f"--fold {args.fold}: must be in 0..{args.folds - 1} for --folds {args.folds}")


def classes_of(args):
    """--classes as a tuple of BUSI's class names, or a one-line error."""
    classes = tuple(args.classes.split(","))
    if not set(classes) <= set(BUSI_CLASSES) or len(set(classes)) != len(classes):
        raise UserError(f"--classes {args.classes}: give distinct names from {','.join(BUSI_CLASSES)}")
    return classes


def load_split_data(args):
    """Check the options, load the data they name, return (data, split of fold args.fold). The split
    is made from --data_seed, or read from the file --split names (see save_splits)."""
    check_options(args)
    data = load_data(args.data, classes_of(args), args.size, args.phantom_count, args.data_seed)
    groups = near_duplicate_groups(data.thumbnails, data.hashes, args.near_dup)
    if getattr(args, "split", None):
        splits = load_splits(args.split, data, args.folds, args.val_fraction, args.data_seed)
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
    if data.merged:
        print(f"data: masks merged for {data.merged} images with several mask files")
    if getattr(args, "split", None):
        part = {i: p for p, idx in split.items() for i in idx}
        across = sum(len({part[i] for i, g in enumerate(groups) if g == key}) > 1 for key in set(groups))
        if across:
            print(f"note: --split puts {across} groups of copies or near-copies across this fold's parts (a leak "
                  f"of that split, or of a validation part drawn image by image from a benchmark's train list; "
                  f"splits made here from --data never do)")
    elif copies or len(data) - len(set(groups)):
        print(f"data: {copies} exact copies and {len(data) - len(set(groups)) - copies} near-copies (thumbnails "
              f"correlating above --near_dup {args.near_dup}) kept on the same side of the split as the image they copy")
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
                          folds=[names_per_part(s, data) for s in splits]))


def load_splits(path, data, folds, val_fraction=0.15, seed=0):
    """The splits that --split names, as index lists into `data`: a file written by save_splits, or
    a public benchmark's name lists (benchmark_splits). Every image of the data must be in exactly
    one part of every fold, and there must be `folds` folds."""
    if os.path.isdir(path) or "," in path:
        parts, saved = benchmark_splits(path, data, val_fraction, seed), {}
    else:
        try:
            with open(path) as f:
                saved = json.load(f)
            parts = saved["folds"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--split {path}: not a split file ({type(e).__name__}); write one with --save_split, "
                            f"or give a folder of busi_trainK.txt and busi_valK.txt lists") from None
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
    if saved and saved.get("data_fingerprint") != data.fingerprint():
        print(f"note: --split {path} was made on images or masks with other pixels (same names), or at another "
              f"--size: another copy of the data?")
    return splits


def benchmark_splits(path, data, val_fraction, seed):
    """A public benchmark's splits as parts of image names: `path` is a folder of busi_train1.txt,
    busi_val1.txt, busi_train2.txt ... (one split per pair), or "TRAIN.txt,VAL.txt" (one split).
    Each list holds one image name a line, without folder or extension ("malignant (84)"). The
    benchmark's val list is our test part (it reports on it); of its train list, `val_fraction` of
    each class, drawn by `seed` image by image (a near-copy may fall on the other side), is our validation
    part (for choosing the epoch), the rest training."""
    if os.path.isdir(path):
        pairs = [(os.path.join(path, f"busi_train{k}.txt"), os.path.join(path, f"busi_val{k}.txt")) for k in range(1, 100)]
        pairs = [p for p in pairs if os.path.isfile(p[0])]
    else:
        pairs = [tuple(path.split(",", 1))]
    if not pairs:
        raise UserError(f"--split {path}: no busi_train1.txt in this folder; give the benchmark's folder of lists")
    by_stem = {os.path.splitext(os.path.basename(n))[0]: n for n in data.names}
    folds = []
    for train_file, test_file in pairs:
        lists = []
        for file in (train_file, test_file):
            try:
                with open(file) as f:
                    stems = [line.strip() for line in f if line.strip()]
            except OSError as e:
                raise UserError(f"--split {file}: cannot read it ({e.strerror}); give TRAIN.txt,VAL.txt") from None
            unknown = [s for s in stems if s not in by_stem]
            if unknown:
                raise UserError(f"--split {file}: {unknown[0]} is not an image of --data; use the data the lists name")
            lists.append([by_stem[s] for s in stems])
        train, test = lists
        val = set(hold_out([data.names.index(n) for n in train], data.labels, val_fraction, seed))
        folds.append(dict(train=[n for n in train if data.names.index(n) not in val],
                          val=[data.names[i] for i in sorted(val)], test=test))
    return folds

def names_per_part(split, data):
    """A split as image names per part: what checkpoints and split files store."""
    return {part: [data.names[i] for i in idx] for part, idx in split.items()}


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
    on GPUs of compute capability 8.0 or more (Ampere, Hopper) and on CPUs with AVX512-BF16 or AMX;
    fp16 with a grad scaler on older GPUs (V100, T4: bf16 there is emulated); fp32 on other CPUs and
    on MPS (not measured by us: try --amp fp16)."""
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


def run_seed(seed, fold):
    """The seed of one (fold, seed) run, drawn from both: every fold's seed s starts from weights of
    its own and sees a data stream of its own, so that 3 folds x 3 seeds are 9 independent
    replicates, not 3 initialisations seen three times. (A student and its teacher of the same
    fold and seed share it, and so do the student alone and the distilled one: that pairing is meant.)"""
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")
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


def sync(device):
    """Wait for the device's queued work, so a clock reading measures it (GPUs run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def fmt_params(n):
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """Write `path` through write(file): into a temporary file of a unique name in the same folder,
    flushed to disk (fsync), then renamed over `path`. A crash or Ctrl-C mid-write never leaves half
    a file, and two runs writing one path never share a temporary file. A write that fails (a full
    disk) is one line, a UserError that names the file and the free space; the old file stays."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write there ({e.strerror}); give a path you can write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save says "unexpected pos", others ENOSPC
        os.unlink(tmp)
        free = shutil.disk_usage(folder).free
        raise UserError(f"{path}: writing it failed with {free / 2**20:.0f} MiB free on its disk "
                        f"({str(e).splitlines()[0][:80]}); the file as it was before is kept: free some space "
                        f"(or write elsewhere) and run again, with --resume to go on") from None
    except BaseException:
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
                args=vars(args), split=names_per_part(split, data),
                data_fingerprint=data.fingerprint(),
                versions=dict(torch=str(torch.__version__), numpy=np.__version__, python=platform.python_version()),
                **extra)


def image_size(ckpt):
    """The side of the images a checkpoint's model was trained on: a student's --student_size where
    it had one (its teacher saw a larger side), else --size."""
    return ckpt["args"].get("student_size") or ckpt["args"]["size"]


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

NEUTRAL_OPTIONS = {"device", "compile", "out", "resume", "data", "teacher", "class_teachers", "split", "save_split",
                   "alone"}  # where files are, how fast it runs, what else is trained: not what a run computes


def run_tag(args, data, split, device, **more):
    """What makes two runs the same run: the options that decide the result (not where the files
    are or how fast it runs), the data's fingerprint, the split, the kind of device (another one
    computes with other kernels and another random generator), and `more` (a student's teachers)."""
    return dict(options={k: v for k, v in sorted(vars(args).items()) if k not in NEUTRAL_OPTIONS},
                split=names_per_part(split, data), data_fingerprint=data.fingerprint(), device=device.type, **more)


def state_path(out):
    """Where an unfinished run keeps its state, beside its checkpoint: out/teacher.pt -> out/teacher.run.pt."""
    return out[:-3] + ".run.pt"


def state_saver(path, tag):
    """kd.fit's `save`: writes the loop's state after each epoch to `path`, with `tag`, atomically
    (a kill mid-write keeps the state of the epoch before)."""
    return lambda state: save_checkpoint(path, dict(project=PROJECT, kind="state", tag=tag, **state))


def resume_state(args, tag):
    """The saved state of an unfinished run to go on from (--resume), or None to start afresh."""
    path = state_path(args.out)
    if not args.resume:
        if os.path.isfile(path):
            print(f"note: {path} holds an unfinished run; starting afresh replaces it (--resume with that run's "
                  f"options would go on with it)")
        return None
    if not os.path.isfile(path):
        raise UserError(f"--resume: no unfinished run at {path}; run without --resume to start one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: {path} is not readable ({type(e).__name__}); run without --resume") from None
    old = state.get("tag") or {}
    if old.get("device", tag["device"]) != tag["device"]:
        raise UserError(f"--resume: {path} ran on {old['device']}, and would go on on {tag['device']} here, with "
                        f"other kernels and random numbers; give --device {old['device']}, or run without --resume")
    if old != tag:
        o, n = old.get("options", {}), tag["options"]
        diff = ", ".join(f"--{k} {o.get(k)} (now {n.get(k)})" for k in sorted(o.keys() | n.keys()) if o.get(k) != n.get(k))
        raise UserError(f"--resume: {path} was made with {diff or 'other data, split or teachers'}; "
                        f"give the same options, or run without --resume to start afresh")
    return state


def can_resume(out, tag):
    """Whether OUT's saved state is of an unfinished run with this very tag, one that can go on."""
    path = state_path(out)
    if not os.path.isfile(path):
        return False
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("tag") == tag
    except Exception:
        return False


def finish(args, ckpt, stopped):
    """Write the finished checkpoint (only now: an unfinished run never replaces an older finished
    one), then drop the run's state, unless Ctrl-C stopped it: --resume can still go on then.
    A kept model that finds no lesion on any validation image gets a note: narrow U-Nets can sit at
    that all-background answer for tens of epochs before they leave it (results/plateau)."""
    save_checkpoint(args.out, ckpt)
    if stopped != "interrupted" and os.path.isfile(state_path(args.out)):
        os.remove(state_path(args.out))
    if ckpt["val"]["dice"] == 0:
        print(f"note: {args.out} scores Dice 0 on every validation image: it has not yet left the answer "
              f"'no lesion anywhere', where narrow U-Nets can stay for tens of epochs; train longer "
              f"(--epochs) or try another --seed")


# ----------------------------------------------------------------------------- running a script

def exit_on_error(main):
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
