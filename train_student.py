"""Distil a tiny U-Net student from a trained teacher; print what distillation gained.

    python train_student.py                                                   # logits, KLD, from out/teacher.pt
    python train_student.py --pathway hidden_regressor --loss mse
    python train_student.py --pathway none                                    # the student alone
    python train_student.py --teacher out/t_seed0.pt,out/t_seed1.pt           # an ensemble of teachers
    python train_student.py --resume                                          # go on with a stopped run
    python train_student.py --class_teachers benign=out/t_benign.pt,malignant=out/t_malignant.pt \
                            --pathway joint --sup wb                          # T2KD-style
    python train_student.py --pathway dckd                                    # DCKD-style
    python train_student.py --teacher out/t192.pt --student_size 96           # a teacher that sees 2x the side

Pathways (Behboodi et al. 2025): logits = L (output maps), hidden = H (bottleneck attention maps),
hidden_regressor = HR (bottleneck through a trained regressor); none = no teacher signal, the
paper's "Student" row. The loss is alpha * L_distill + (1 - alpha) * L_sup (Eq. I).
Two more methods, each our reading of a paper whose formulas are not public:
  joint   L and HR at once, L_distill = L_L + L_HR (T2KD's "double path", Guo et al. 2025); with
          --class_teachers each image is distilled from the teacher of its class, and --sup wb
          replaces cross-entropy by the weight balance loss (losses.weight_balance_loss);
  dckd    decoupled contrastive distillation (Pan et al. 2023): a projector maps the student's
          features at --dckd_level to the teacher's width; L_sup + lambda_con L_con + lambda_rank
          L_rank (losses.dckd_loss). A batch with no lesion position at that level's scale (or no
          background) gets L_sup alone; the share of such images is printed as "skipped".

To show what distillation did, a distilled run also needs the student alone on the same split:
it is trained first (out/student_alone.pt beside --out) or, when a finished one with the same
options is there, reused (a stopped one goes on from its saved state); the run ends with a table of
teacher, student alone and distilled student. --no-alone skips it.

The student uses its teacher's data, image size (or a divisor of it: --student_size) and split,
recomputed here and checked against the split stored in the teacher's checkpoint: a student tested
on images its teacher trained on would be a leak, so a different split is refused. Several teachers
(comma-separated) are distilled as one, the mean of their logits (models.Ensemble); each must have
the same split.
Files: as train_teacher.py, the run's state goes to OUT's .run.pt after every epoch (--resume goes
on from it), and OUT itself is written only when the run ends.
"""
import argparse
import copy
import dataclasses
import os

import torch.nn.functional as F

from data import UserError, load_data, near_duplicate_groups
import kd
import runs
from models import ClassTeachers, Ensemble, Pooled, UNet, count_parameters, fast_model

DEFAULTS = dict(  # every default in one place
    teacher="out/teacher.pt",
    route="label",
    pathway="logits",
    loss="kld",
    alpha=0.5,
    T=1.0,
    sup="ce",
    dckd_level="bottleneck",
    lambda_con=1.0,
    lambda_rank=0.5,
    tau=0.1,
    anchors=128,
    negatives=256,
    hard=8,
    delta=0.2,
    teacher_flip=False,
    fast_teacher=False,
    width=10,
    student_size=None,  # None: the teacher's
    aug="strong",
    epochs=120,  # BUSI at 96 px, cosine at 1e-3: 60 -> 120 still gained, 120 -> 240 did not (results/plateau)
    patience=120,  # no early stop: the last epochs, at the smallest rates, are where a run settles
    batch_size=16,
    lr=0.001,
    schedule="cosine",  # the paper: constant 1e-4, which leaves runs improving at their last epoch
    warmup=3,
    select="last",  # the cosine's end beat the lowest-val-loss epoch in 29 of 45 probes (results/plateau)
    dice_weight=0.0,
    seed=0,
    device="auto",
    amp="auto",
    compile=False,
    alone=True,
    resume=False,
)
SPLIT_OPTIONS = dict(classes=str, size=int, folds=int, fold=int, val_fraction=float, data_seed=int, phantom_count=int,
                     near_dup=float, split=str)  # a student's data and split are its teacher's
DISTIL_OPTIONS = {"loss", "alpha", "T", "teacher_flip", "fast_teacher", "route", "dckd_level", "lambda_con", "lambda_rank", "tau",
                  "anchors", "negatives", "hard", "delta"}  # meaningless for the student alone
BEFORE = {"near_dup": 0.0}  # the split options' values for teachers trained before the option existed
PHANTOM_DEMO = dict(epochs=16, batch_size=8)  # on the phantom: as train_teacher.py's
PHANTOM_DEMO_STUDENT_SIZE = {96: 48}  # under the quick start's 96-px teacher, a student at 48 px: there the
# teacher leads the student alone on validation in 3 seeds of 3; at 96 px it led in none (README)


def options():
    """The command line, in plain argparse; the defaults are DEFAULTS."""
    p = runs.parser(__doc__, DEFAULTS)
    add = p.add_argument
    add("--teacher", help="teacher checkpoint written by train_teacher.py; several, comma-separated, are an "
        "ensemble: the mean of their logits (logits pathway only)")
    add("--class_teachers", help="T2KD: two class teachers (train_teacher.py --only_class) as CLASS=PATH, "
        "comma-separated, e.g. benign=out/t_benign.pt,malignant=out/t_malignant.pt; replaces --teacher")
    add("--route", choices=["label", "mean"], help="class teachers: label sends each image to its class's teacher; "
        "mean averages both (ablation)")
    add("--pathway", choices=["logits", "hidden", "hidden_regressor", "joint", "dckd", "none"],
        help="what is distilled: logits (L), hidden (H), hidden_regressor (HR), joint (L + HR), dckd (decoupled "
        "contrastive), none (student alone)")
    add("--loss", choices=["mse", "kld", "cwd"], help="L_distill: mse (Eq. II), kld (Eq. III), or cwd "
        "(channel-wise: each class map a distribution over pixels; logits only)")
    add("--alpha", type=float, help="weight of L_distill in Eq. I; L_sup gets 1 - alpha (the paper: 0.5)")
    add("--T", type=float, help="KLD temperature T; the KL is scaled by T^2 (the paper gives none: 1)")
    add("--sup", choices=["ce", "wb"], help="L_sup: ce, pixel-wise cross-entropy (Eq. IV); wb, the weight balance "
        "loss (T2KD-style)")
    add("--dckd_level", choices=["enc4", "bottleneck", "dec4", "dec3"], help="DCKD: the feature level compared")
    add("--lambda_con", type=float, help="DCKD: weight of the contrastive loss L_con")
    add("--lambda_rank", type=float, help="DCKD: weight of the ranking loss L_rank")
    add("--tau", type=float, help="DCKD: temperature of L_con (CIRKD's 0.1)")
    add("--anchors", type=int, help="DCKD: student anchors drawn per class (lesion, background) per batch")
    add("--negatives", type=int, help="DCKD: teacher features of the other class drawn per class per batch")
    add("--hard", type=int, help="DCKD: the hardest negatives (closest to the anchor) that L_rank looks at")
    add("--delta", type=float, help="DCKD: margin of L_rank in cosine distance")
    add("--teacher_flip", action=argparse.BooleanOptionalAction, help="distil the mean of the teacher's outputs on "
        "the image and its mirror image (a two-view ensemble: a stronger, smoother signal for the same "
        "teacher)")
    add("--fast_teacher", action=argparse.BooleanOptionalAction, help="run the frozen teacher in its fast form "
        "(models.fast_model: BatchNorm folded, weights in the autocast dtype): its outputs up to bf16 "
        "rounding, a cheaper distillation step")
    add("--width", type=int, help="student U-Net width w, levels w..16w: 10 = 0.76M params (the paper: 0.82M)")
    add("--student_size", type=int, help="the student's image side, a divisor of the teacher's --size (192 for 96): "
        "the teacher sees each image at its own size, its outputs and features averaged onto the student's grid "
        "(models.Pooled); default the teacher's")
    add("--aug", choices=["none", "weak", "strong"], help="student's augmentation (the teacher sees the same "
        "augmented batch)")
    add("--epochs", type=int, help="most epochs (the paper: 500)")
    add("--patience", type=int, help="early stopping: epochs without a better --select score (never with --select "
        "last; the paper: 50, by validation loss)")
    add("--batch_size", type=int, help="images per step (the paper: 64)")
    add("--lr", type=float, help="Adam's peak learning rate (the paper: 1e-4, constant)")
    add("--schedule", choices=["constant", "cosine"], help="learning rate over the run: constant (the paper), or "
        "cosine: a linear warm-up of --warmup epochs, then a cosine decay to 0 at --epochs")
    add("--warmup", type=int, help="epochs of linear warm-up of the cosine schedule")
    add("--select", choices=["last", "loss", "dice"], help="which epoch's weights are kept: the last (the end of "
        "the cosine decay), lowest validation loss (the paper), or highest validation Dice")
    add("--dice_weight", type=float, help="weight of an added soft-Dice term in L_sup (the paper: 0)")
    add("--seed", type=int, help="seed of weights, batch order and augmentation")
    add("--device", help="auto (cuda, then mps, then cpu), or a torch device")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision: auto, bf16, fp16 or off (fp32)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the training forward passes (faster "
        "on GPUs after a warm-up)")
    add("--alone", action=argparse.BooleanOptionalAction, help="also train (or reuse) the student alone on the same "
        "split, for the gain table")
    add("--resume", action=argparse.BooleanOptionalAction, help="go on with the unfinished run saved at OUT's "
        ".run.pt (same options, data and split)")
    add("--out", help="where the checkpoint goes (default: out/student_PATHWAY_LOSS.pt, out/student_alone.pt)")
    add_split_options(p.add_argument_group("the data and split: the teacher's (give them only to check)"))
    return p


def add_split_options(group):
    add = group.add_argument
    add("--data", help="the teacher's data folder, if it is elsewhere on this machine (default: the teacher's)")
    for name, kind in SPLIT_OPTIONS.items():
        add(f"--{name}", type=kind, help="must match the teacher's")


# ----------------------------------------------------------------------------- 1. teachers and their split

def teacher_paths(args):
    """(paths, classes): the --teacher files, or the --class_teachers files and their classes (else None)."""
    if not args.class_teachers:
        return [p for p in args.teacher.split(",") if p], None
    pairs = [w.split("=", 1) for w in args.class_teachers.split(",") if w]
    classes = [p[0] for p in pairs]
    if any(len(p) != 2 or not p[1] for p in pairs) or len(pairs) < 2 or len(set(classes)) != len(classes):
        raise UserError(f"--class_teachers {args.class_teachers}: give CLASS=PATH for two or more classes, "
                        f"e.g. benign=out/t_benign.pt,malignant=out/t_malignant.pt")
    return [p[1] for p in pairs], classes


def load_teachers(p, argv, args):
    """Load the teacher checkpoints, take their data and split options, and check that the split
    made here is theirs. Returns (options, teacher checkpoints, data, split)."""
    paths, classes = teacher_paths(args)
    option = "--class_teachers" if classes else "--teacher"
    if args.loss == "cwd" and args.pathway != "logits":
        raise UserError("--loss cwd: channel-wise distillation compares output maps; use it with --pathway logits")
    ckpts = [runs.load_checkpoint(p, "teacher", option) for p in paths]
    if len(ckpts) > 1 and not classes and args.pathway not in ("logits", "none"):
        raise UserError(f"--pathway {args.pathway}: an ensemble of teachers has no common bottleneck "
                        "(their channels do not correspond); distil its logits: --pathway logits")
    for i, (path, t) in enumerate(zip(paths, ckpts)):
        own = t["args"].get("only_class")
        if classes is None and own:
            raise UserError(f"--teacher {path}: trained on {own} images only (a class teacher); give a teacher "
                            f"of every class, or give class teachers with --class_teachers")
        if classes is not None and own != classes[i]:
            raise UserError(f"--class_teachers {classes[i]}={path}: that teacher was trained on "
                            f"{own + ' images only' if own else 'every class'}; train it with --only_class {classes[i]}")
        if classes is not None and t["model_config"] != ckpts[0]["model_config"]:
            raise UserError(f"--class_teachers {classes[i]}={path}: another width than {paths[0]}; "
                            f"class teachers must be of one width (their features are mixed per image)")
    first = ckpts[0]["args"]
    args.data = args.data or first["data"]
    demo = dict(PHANTOM_DEMO, student_size=PHANTOM_DEMO_STUDENT_SIZE.get(first["size"]))
    args = runs.choose_data(p, argv, args, demo)
    for k in SPLIT_OPTIONS:  # the teacher's split, or a clear refusal
        if getattr(args, k) is not None and getattr(args, k) != first.get(k):
            raise UserError(f"--{k} {getattr(args, k)}: teacher {paths[0]} was trained with --{k} {first.get(k)}; "
                            f"a student must use its teacher's split (train a teacher with --{k} {getattr(args, k)})")
        setattr(args, k, first.get(k, BEFORE.get(k)))
    data, splits = runs.load_split_data(args)
    split = splits[args.fold]
    for path, t in zip(paths, ckpts):
        if runs.names_per_part(split, data) != t["split"]:
            raise UserError(f"{option} {path}: its stored split differs from the one made here from "
                            f"--data {args.data}; use the data and split the teacher was trained on")
        if data.fingerprint() != t["data_fingerprint"]:
            raise UserError(f"--data {args.data}: the images or masks differ from those teacher {path} was "
                            f"trained on (same names); use the teacher's data")
    for c in classes or []:
        if c not in data.labels:
            raise UserError(f"--class_teachers {c}=...: the data holds no {c} images; give teachers of its classes "
                            f"({', '.join(dict.fromkeys(data.labels))})")
    return args, ckpts, data, split


def student_data(args, data):
    """(the student's data, factor): the teacher's data and 1, or with --student_size the same images at
    that side, a divisor of the teacher's: each factor x factor block of the teacher's grid is one
    pixel of the student's. Files are read again at that side (what a student trained there sees);
    the phantom, drawn anew at every size, is shrunk from the teacher's instead."""
    size = args.student_size or args.size
    if size == args.size:
        return data, 1
    if not 0 < size < args.size or args.size % size:
        raise UserError(f"--student_size {size}: must divide the teacher's --size {args.size} (e.g. {args.size // 2}); "
                        f"or train a teacher at a multiple of it")
    if data.source == "phantom":
        images = F.interpolate(data.images.float(), size=size, mode="area").round().to(data.images.dtype)
        masks = (F.interpolate(data.masks.float(), size=size, mode="area") >= 0.5).to(data.masks.dtype)
        small = dataclasses.replace(data, images=images, masks=masks)
    else:
        small = load_data(args.data, tuple(args.classes.split(",")), size, args.phantom_count, args.data_seed)
    print(f"student: images at {size}x{size}; the teacher sees them at {args.size}x{args.size}, its outputs and "
          f"features averaged over {args.size // size}x{args.size // size} blocks")
    return small, args.size // size


def run_tag(args, data, split, paths, device):
    """What identifies a student's run (runs.run_tag): its options and split, and which exact teacher
    files it learns from. The student alone depends on neither the teachers nor the distillation options."""
    alone = args.pathway == "none"
    tag = runs.run_tag(args, data, split, device, teachers=[] if alone else [runs.file_hash(p) for p in paths])
    tag["options"] = {k: v for k, v in tag["options"].items() if not (alone and k in DISTIL_OPTIONS)}
    return tag


# ----------------------------------------------------------------------------- 2. one training run

def train(args, teacher, n_teacher, data, split, device, dtype, tag, teacher_images=None):
    """Train one student (distilled, or alone with --pathway none) from `teacher` (frozen; its fast
    form with --fast_teacher), which has n_teacher parameters as trained; return its checkpoint.
    teacher_images: the images at the teacher's larger side (--student_size), on the device."""
    images, masks = data.images.to(device), data.masks.to(device)
    seed = runs.run_seed(args.seed, args.fold)
    student = runs.to_device(UNet(args.width), device)
    regressor, projector = kd.extra_modules(args, student, teacher, device)
    extras = [m for m in (regressor, projector) if m is not None]
    print(f"student: {runs.fmt_params(count_parameters(student))} parameters (width {args.width}); "
          f"distilling {args.pathway}" + ("" if args.pathway == "none" else f" with {args.loss}")
          + f"; device {device}, precision {runs.precision_name(dtype)}")
    step = kd.make_step(args, runs.maybe_compile(student, args.compile), runs.maybe_compile(teacher, args.compile),
                        kd.class_indices(teacher, data, device), regressor, projector, seed)
    fitted = kd.fit(student, images, masks, split, step, device=device, dtype=dtype, extras=extras,
                 epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                 schedule=args.schedule, warmup=args.warmup, select=args.select, aug=args.aug, seed=seed,
                 dice_weight=args.dice_weight, sup=args.sup, generators=step.generators,
                 teacher_images=teacher_images, resume=runs.resume_state(args, tag),
                 save=runs.state_saver(runs.state_path(args.out), tag))
    student.load_state_dict(fitted["best_state"])
    test = kd.evaluate(student, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight,
                       args.sup)
    test.update(names=runs.names_per_part(split, data)["test"], train_seconds=fitted["train_seconds"])
    ckpt = runs.make_checkpoint("student", student, args, data, split, parameters=count_parameters(student),
                                teacher=args.teacher, teacher_parameters=n_teacher, epoch=fitted["best_epoch"],
                                history=fitted["history"], val=fitted["best_val"], test=test, stopped=fitted["stopped"],
                                precision=runs.precision_name(dtype), machine=runs.machine_name(device), tag=tag)
    runs.finish(args, ckpt, fitted["stopped"])
    print(f"student test ({len(split['test'])} images, fold {args.fold}): Dice {100 * test['dice']:.2f} "
          f"+- {100 * test['dice_std']:.2f}; best epoch {fitted['best_epoch']} ({fitted['stopped']}); "
          f"trained {kd.fmt_time(fitted['train_seconds'])}; saved {args.out}")
    return ckpt


def evaluate_teacher(teacher, data, split, device, dtype, args, masks=None):
    """Test metrics of the teacher. Class teachers routed by label are each tested on their class's
    test images (routed by the true class, which only they are given), and the per-image Dice put
    together; averaged (--route mean), they are one teacher. masks: the student's (--student_size),
    on whose grid a Pooled teacher answers."""
    images, masks = data.images.to(device), (data.masks if masks is None else masks).to(device)
    if not isinstance(teacher, ClassTeachers) or teacher.route == "mean":
        return kd.evaluate(teacher, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight)
    dice = {}
    for c, member in zip(teacher.classes, teacher.members):
        mine = [i for i in split["test"] if data.labels[i] == c]
        if mine:
            dice.update(zip(mine, kd.evaluate(member, images, masks, mine, device, dtype, args.batch_size)["per_image_dice"]))
    per_image = [dice[i] for i in split["test"] if i in dice]
    return dict(dice=sum(per_image) / len(per_image), per_image_dice=per_image)


def student_alone(args, teacher, data, split, device, dtype, paths):
    """The student alone on the same split: a finished checkpoint with the same options is reused;
    a run of it that was stopped (Ctrl-C, a crash) goes on from its saved state; else it is trained.
    A baseline stopped early would make distillation look better than it is."""
    alone = copy.copy(args)
    alone.pathway = "none"
    alone.out = os.path.join(os.path.dirname(args.out), "student_alone.pt")
    tag = run_tag(alone, data, split, paths, device)
    alone.resume = runs.can_resume(alone.out, tag)
    if os.path.isfile(alone.out):
        ckpt = runs.load_checkpoint(alone.out, "student", "student alone")
        if ckpt.get("tag") == tag and ckpt.get("stopped") != "interrupted":
            print(f"student alone: reusing {alone.out} (same split and options)")
            return ckpt
        if not alone.resume:
            print(f"student alone: {alone.out} was trained with other options or another split, or stopped "
                  f"before its end; training it again")
    if alone.resume:
        print(f"student alone: going on with the stopped run in {runs.state_path(alone.out)}")
    print("\n--- the student alone, for comparison")
    runs.seed_everything(runs.run_seed(args.seed, args.fold))  # the same initial weights as the distilled student
    return train(alone, teacher, count_parameters(teacher), data, split, device, dtype, tag)


# ----------------------------------------------------------------------------- 3. the report

def report(teacher_test, n_teacher, students, units=None):
    """The table that shows what distillation did: teacher, student alone, distilled student, and
    the distilled student's gain with its 95% interval over the test images (paired image by image;
    `units`: each test image's group of near-copies, which makes the interval's standard error clustered)."""
    dice = lambda r: 100 * r["dice"]
    rows = [("teacher", n_teacher, teacher_test)] + [(name, c["parameters"], c["test"]) for name, c in students]
    w = max(len(name) for name, _, _ in rows) + 2
    print(f"\n{'':{w}s}{'parameters':>10s}  {'test Dice':>9s}")
    for name, n, r in rows:
        print(f"{name:{w}s}{runs.fmt_params(n):>10s}  {dice(r):9.2f}")
    if len(students) == 2:
        alone, distilled = (c["test"]["per_image_dice"] for _, c in students)
        gain, lo, hi = kd.paired_interval([100 * (d - a) for d, a in zip(distilled, alone)], units=units)
        verdict = "above 0" if lo > 0 else "below 0" if hi < 0 else "too close to call"
        groups = len(alone) if units is None else len(set(units))
        over = f"{len(alone)} test images" + (f" in {groups} groups of near-copies" if groups < len(alone) else "")
        print(f"distillation: {gain:+.2f} Dice over the student alone, 95% interval [{lo:+.2f}, {hi:+.2f}] over "
              f"{over}: {verdict} (conditional on these two trained models and this split)")
        if len(teacher_test["per_image_dice"]) == len(alone):
            lead, lo, hi = kd.paired_interval([100 * (t - a) for t, a in zip(teacher_test["per_image_dice"], alone)],
                                              units=units)
            share = (f"distillation recovered {100 * gain / lead:.0f}% of it" if lo > 0 else
                     "not clearly above 0, so no share of it is given")
            print(f"the teacher's lead over the student alone: {lead:+.2f} [{lo:+.2f}, {hi:+.2f}]; {share}")
    n_student = students[-1][1]["parameters"]
    print(f"the student has {n_teacher / n_student:.1f}x fewer parameters than the teacher" if n_teacher > n_student
          else f"the student has {n_student / n_teacher:.1f}x the teacher's parameters")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the student's checkpoint, with
    the test metrics of its teacher (or ensemble) added as teacher_test."""
    # 1. The teachers, and the data and split they were trained on
    p = options()
    args, teacher_ckpts, data, split = load_teachers(p, argv, p.parse_args(argv))
    paths, classes = teacher_paths(args)
    args.out = args.out or os.path.join("out", "student_alone.pt" if args.pathway == "none"
                                        else f"student_{args.pathway}_{args.loss}.pt")
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    if os.path.abspath(args.out) in map(os.path.abspath, paths):
        raise UserError(f"--out {args.out}: that is a teacher's file; choose another name")
    if args.resume and not os.path.isfile(runs.state_path(args.out)):  # said now, not after the student alone
        raise UserError(f"--resume: no unfinished run at {runs.state_path(args.out)}; run without --resume to start "
                        f"one (a stopped student alone goes on by itself)")
    device = runs.pick_device(args.device)
    dtype = runs.amp_dtype(device, args.amp)
    small, factor = student_data(args, data)  # a student at a smaller side: the teacher answers on its grid
    teacher_images = data.images.to(device) if factor > 1 and args.pathway != "none" else None
    members = [runs.build_model(t) if factor == 1 else Pooled(runs.build_model(t), factor) for t in teacher_ckpts]
    if classes:
        teacher = ClassTeachers(members, classes, args.route)
    else:
        teacher = members[0] if len(members) == 1 else Ensemble(members)
    teacher = runs.to_device(teacher.eval(), device).requires_grad_(False)  # eval mode, frozen
    distilling_teacher = fast_model(teacher, device, dtype) if args.fast_teacher else teacher
    widths = "+".join(str(t["model_config"]["width"]) for t in teacher_ckpts)
    print(f"teacher: {runs.fmt_params(count_parameters(teacher))} parameters (width {widths})")

    # 2. The student alone on the same split: trained, or a finished one reused
    students = []
    if args.alone and args.pathway != "none":
        students.append(("student alone", student_alone(args, teacher, small, split, device, dtype, paths)))
        if students[0][1]["stopped"] == "interrupted":  # Ctrl-C: stop here, not only the student alone
            print("stopped with the student alone unfinished; the same command (without --resume) goes on with it")
            raise SystemExit(130)
        print(f"\n--- the student distilled ({args.pathway})")
    # 3. The student distilled (or alone, with --pathway none), from the same initial weights
    runs.seed_everything(runs.run_seed(args.seed, args.fold))
    ckpt = train(args, distilling_teacher, count_parameters(teacher), small, split, device, dtype,
                 run_tag(args, small, split, paths, device), teacher_images)
    name = ("student alone" if args.pathway == "none" else "distilled (dckd)" if args.pathway == "dckd"
            else f"distilled ({args.pathway}, {args.loss})")
    students.append((name, ckpt))

    # 4. What distillation did
    teacher_test = evaluate_teacher(teacher, data, split, device, dtype, args, small.masks)
    groups = near_duplicate_groups(data.thumbnails, data.hashes, args.near_dup)  # each set of near-copies: one group
    report(teacher_test, count_parameters(teacher), students, [groups[i] for i in split["test"]])
    return dict(ckpt, teacher_test=teacher_test)


if __name__ == "__main__":
    runs.exit_on_error(main)
