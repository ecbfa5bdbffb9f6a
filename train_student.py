"""Distil a tiny U-Net student from a trained teacher; print what distillation gained.

    python train_student.py                                                   # logits, KLD, from out/teacher.pt
    python train_student.py --pathway hidden_regressor --loss mse
    python train_student.py --pathway none                                    # the student alone
    python train_student.py --teacher out/t_seed0.pt,out/t_seed1.pt           # an ensemble of teachers
    python train_student.py --resume                                          # go on with a stopped run
    python train_student.py --class_teachers benign=out/t_benign.pt,malignant=out/t_malignant.pt \
                            --pathway joint --sup wb                          # T2KD-style
    python train_student.py --pathway dckd                                    # DCKD-style

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
options is there, reused; the run ends with a table of teacher, student alone and distilled
student. --no-alone skips it.

The student uses its teacher's data, image size and split, recomputed here and checked against
the split stored in the teacher's checkpoint: a student tested on images its teacher trained on
would be a leak, so a different split is refused. Several teachers (comma-separated) are distilled
as one, the mean of their logits (models.Ensemble); each must have the same split.
Files: as train_teacher.py, the run's state goes to OUT's .run.pt after every epoch (--resume goes
on from it), and OUT itself is written only when the run ends.
"""
import copy
import os

import torch

from data import UserError
import kd
from losses import dckd_loss, distillation_loss, supervised_loss, total_loss
from models import ClassTeachers, Ensemble, Mirrored, Projector, Regressor, UNet, count_parameters, fast_model

OPTIONS = [  # (name, default, help[, choices]): every default in one place
    ("teacher", "out/teacher.pt", "teacher checkpoint written by train_teacher.py; several, comma-separated, "
     "are an ensemble: the mean of their logits (logits pathway only)"),
    ("class_teachers", str, "T2KD: two class teachers (train_teacher.py --only_class) as CLASS=PATH, comma-separated, "
     "e.g. benign=out/t_benign.pt,malignant=out/t_malignant.pt; replaces --teacher"),
    ("route", "label", "class teachers: label sends each image to its class's teacher; mean averages both (ablation)",
     ["label", "mean"]),
    ("pathway", "logits", "what is distilled: logits (L), hidden (H), hidden_regressor (HR), joint (L + HR), "
     "dckd (decoupled contrastive), none (student alone)", ["logits", "hidden", "hidden_regressor", "joint", "dckd", "none"]),
    ("loss", "kld", "L_distill: mse (Eq. II) or kld (Eq. III)", ["mse", "kld"]),
    ("alpha", 0.5, "weight of L_distill in Eq. I; L_sup gets 1 - alpha (the paper: 0.5)"),
    ("T", 1.0, "KLD temperature T; the KL is scaled by T^2 (the paper gives none: 1)"),
    ("sup", "ce", "L_sup: ce, pixel-wise cross-entropy (Eq. IV); wb, the weight balance loss (T2KD-style)", ["ce", "wb"]),
    ("dckd_level", "bottleneck", "DCKD: the feature level compared", ["enc4", "bottleneck", "dec4", "dec3"]),
    ("lambda_con", 1.0, "DCKD: weight of the contrastive loss L_con"),
    ("lambda_rank", 0.5, "DCKD: weight of the ranking loss L_rank"),
    ("tau", 0.1, "DCKD: temperature of L_con (CIRKD's 0.1)"),
    ("anchors", 128, "DCKD: student anchors drawn per class (lesion, background) per batch"),
    ("negatives", 256, "DCKD: teacher features of the other class drawn per class per batch"),
    ("hard", 8, "DCKD: the hardest negatives (closest to the anchor) that L_rank looks at"),
    ("delta", 0.2, "DCKD: margin of L_rank in cosine distance"),
    ("teacher_flip", False, "distil the mean of the teacher's outputs on the image and its mirror image "
     "(a two-view ensemble: a stronger, smoother signal for the same teacher)"),
    ("fast_teacher", False, "run the frozen teacher in its fast form (models.fast_model: BatchNorm folded, weights "
     "in the autocast dtype): its outputs up to bf16 rounding, a cheaper distillation step"),
    ("width", 10, "student U-Net width w, levels w..16w: 10 = 0.76M params (the paper: 0.82M)"),
    ("aug", "strong", "student's augmentation (the teacher sees the same augmented batch)",
     ["none", "weak", "strong"]),
    ("epochs", 100, "most epochs (the paper: 500)"),
    ("patience", 20, "early stopping: epochs without a better validation loss (the paper: 50)"),
    ("batch_size", 16, "images per step (the paper: 64)"),
    ("lr", 1e-4, "Adam learning rate (the paper: 1e-4)"),
    ("schedule", "constant", "learning rate over the run: constant (the paper), or cosine: a linear warm-up "
     "of --warmup epochs, then a cosine decay to 0 at --epochs", ["constant", "cosine"]),
    ("warmup", 3, "epochs of linear warm-up of the cosine schedule"),
    ("select", "loss", "which epoch's weights are kept: lowest validation loss (the paper), or highest validation "
     "Dice", ["loss", "dice"]),
    ("dice_weight", 0.0, "weight of an added soft-Dice term in L_sup (the paper: 0)"),
    ("seed", 0, "seed of weights, batch order and augmentation"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "mixed precision: auto, bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("compile", False, "torch.compile the training forward passes (faster on GPUs after a warm-up)"),
    ("alone", True, "also train (or reuse) the student alone on the same split, for the gain table"),
    ("resume", False, "go on with the unfinished run saved at OUT's .run.pt (same options, data and split)"),
    ("out", str, "where the checkpoint goes (default: out/student_PATHWAY_LOSS.pt, out/student_alone.pt)"),
    # The data and split are the teacher's. Give --data if its folder moved; the rest only to check.
    ("data", str, "the teacher's data folder, if it is elsewhere on this machine (default: the teacher's)"),
    ("classes", str, "must match the teacher's"),
    ("size", int, "must match the teacher's"),
    ("folds", int, "must match the teacher's"),
    ("fold", int, "must match the teacher's: train a teacher per fold"),
    ("val_fraction", float, "must match the teacher's"),
    ("data_seed", int, "must match the teacher's"),
    ("phantom_count", int, "must match the teacher's"),
    ("near_dup", float, "must match the teacher's"),
    ("split", str, "must match the teacher's"),
]
SPLIT_OPTIONS = ["classes", "size", "folds", "fold", "val_fraction", "data_seed", "phantom_count", "near_dup", "split"]
DISTIL_OPTIONS = {"loss", "alpha", "T", "teacher_flip", "fast_teacher", "route", "dckd_level", "lambda_con", "lambda_rank", "tau",
                  "anchors", "negatives", "hard", "delta"}  # meaningless for the student alone
BEFORE = {"near_dup": 0.0}  # the split options' values for teachers trained before the option existed
PATHS = {"logits": ["logits"], "hidden": ["hidden"], "hidden_regressor": ["hidden_regressor"],
         "joint": ["logits", "hidden_regressor"]}  # the paper's pathways each pathway option sums
PHANTOM_DEMO = dict(epochs=16, batch_size=8, lr=1e-3)  # on the phantom: as train_teacher.py's


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


def load_teachers(args, given):
    """Load the teacher checkpoints, take their data and split options, and check that the split
    made here is theirs. Returns (teacher checkpoints, data, split)."""
    paths, classes = teacher_paths(args)
    option = "--class_teachers" if classes else "--teacher"
    ckpts = [kd.load_checkpoint(p, "teacher", option) for p in paths]
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
    for k in SPLIT_OPTIONS:  # the teacher's split, or a clear refusal
        if getattr(args, k) is not None and getattr(args, k) != first.get(k):
            raise UserError(f"--{k} {getattr(args, k)}: teacher {paths[0]} was trained with --{k} {first.get(k)}; "
                            f"a student must use its teacher's split (train a teacher with --{k} {getattr(args, k)})")
        setattr(args, k, first.get(k, BEFORE.get(k)))
    args.data = args.data or first["data"]
    kd.choose_data(args, given, PHANTOM_DEMO)
    data, splits = kd.load_split_data(args)
    split = splits[args.fold]
    named = {k: [data.names[i] for i in v] for k, v in split.items()}
    for path, t in zip(paths, ckpts):
        if named != t["split"]:
            raise UserError(f"{option} {path}: its stored split differs from the one made here from "
                            f"--data {args.data}; use the data and split the teacher was trained on")
        if data.fingerprint() != t["data_fingerprint"]:
            raise UserError(f"--data {args.data}: the images or masks differ from those teacher {path} was "
                            f"trained on (same names); use the teacher's data")
    for c in classes or []:
        if c not in data.labels:
            raise UserError(f"--class_teachers {c}=...: the data holds no {c} images; give teachers of its classes "
                            f"({', '.join(dict.fromkeys(data.labels))})")
    return ckpts, data, split


def run_tag(args, data, split, paths):
    """What identifies a student's run (kd.run_tag): its options and split, and which exact teacher
    files it learns from. The student alone depends on neither the teachers nor the distillation options."""
    alone = args.pathway == "none"
    tag = kd.run_tag(args, data, split, teachers=[] if alone else [kd.file_hash(p) for p in paths])
    tag["options"] = {k: v for k, v in tag["options"].items() if not (alone and k in DISTIL_OPTIONS)}
    return tag


# ----------------------------------------------------------------------------- 2. one training run

def extra_modules(args, student, teacher, device):
    """(regressor, projector): what learns with the student for HR and for DCKD (else None). They
    are thrown away after training: not counted in, nor saved with, the student."""
    regressor = projector = None
    if "hidden_regressor" in PATHS.get(args.pathway, []):
        regressor = kd.to_device(Regressor(student.feature_channels["bottleneck"],
                                           teacher.feature_channels["bottleneck"]), device)
    if args.pathway == "dckd":
        projector = kd.to_device(Projector(student.feature_channels[args.dckd_level],
                                           teacher.feature_channels[args.dckd_level]), device)
    return regressor, projector


def make_step(args, student, teacher, classes=None, regressor=None, projector=None, seed=0):
    """One training step of the student, step(x, y, idx) -> dict of losses ("loss" is minimised):
    what --pathway, --loss, --sup and the rest of `args` say. `teacher` is frozen; with class
    teachers, classes[idx] is each image's teacher. The regressor (HR) and the projector (DCKD)
    learn with the student. step.generators: the random generators it draws from (saved with a
    run's state, so that a resumed run draws what an uninterrupted one would); `seed` seeds DCKD's."""
    anchor_generator = torch.Generator().manual_seed(seed)  # DCKD's own: the data stream stays as it is
    if args.teacher_flip:  # the mean of the teacher's outputs on the image and its mirror image
        teacher = Mirrored(teacher)

    def teach(x, idx):
        if classes is None:
            return teacher(x, return_features=True)
        return teacher(x, classes[idx], return_features=True)  # each image to its class's teacher

    def step(x, y, idx):
        s_logits, s_feats = student(x, return_features=True)
        l_sup = supervised_loss(s_logits.float(), y, args.dice_weight, args.sup)
        if args.pathway == "none":
            return dict(loss=l_sup)
        with torch.no_grad():
            t_logits, t_feats = teach(x, idx)
        if args.pathway == "dckd":
            terms = dckd_loss(projector(s_feats[args.dckd_level]), t_feats[args.dckd_level], y, anchor_generator,
                              args.anchors, args.negatives, args.tau, args.hard, args.delta)
            if terms is None:  # no lesion (or no background) position at this level's scale: L_sup alone
                return dict(loss=l_sup, sup=l_sup, skipped=torch.ones((), device=x.device))
            l_con, l_rank = terms
            return dict(loss=l_sup + args.lambda_con * l_con + args.lambda_rank * l_rank, sup=l_sup, con=l_con,
                        rank=l_rank, skipped=torch.zeros((), device=x.device))
        l_kd = sum(distillation_loss(p, args.loss, s_logits, s_feats, t_logits, t_feats, regressor, args.T)
                   for p in PATHS[args.pathway])
        return dict(loss=total_loss(l_kd, l_sup, args.alpha), sup=l_sup, kd=l_kd)

    step.generators = (anchor_generator,) if args.pathway == "dckd" else ()  # saved and restored by kd.fit
    return step


def train(args, teacher, n_teacher, data, split, device, dtype, tag):
    """Train one student (distilled, or alone with --pathway none) from `teacher` (frozen; its fast
    form with --fast_teacher), which has n_teacher parameters as trained; return its checkpoint."""
    images, masks = data.images.to(device), data.masks.to(device)
    student = kd.to_device(UNet(args.width), device)
    regressor, projector = extra_modules(args, student, teacher, device)
    extras = [m for m in (regressor, projector) if m is not None]
    print(f"student: {kd.fmt_params(count_parameters(student))} parameters (width {args.width}); "
          f"distilling {args.pathway}" + ("" if args.pathway == "none" else f" with {args.loss}")
          + f"; device {device}, precision {kd.precision_name(dtype)}")
    step = make_step(args, kd.maybe_compile(student, args.compile), kd.maybe_compile(teacher, args.compile),
                     class_indices(teacher, data, device), regressor, projector, kd.run_seed(args.seed, args.fold))
    run = kd.fit(student, images, masks, split, step, device=device, dtype=dtype, extras=extras,
                 epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                 schedule=args.schedule, warmup=args.warmup, select=args.select, aug=args.aug,
                 seed=kd.run_seed(args.seed, args.fold), dice_weight=args.dice_weight, state_path=kd.state_path(args.out),
                 resume=kd.resume_state(args, tag), tag=tag, generators=step.generators)
    student.load_state_dict(run["best_state"])
    test = kd.evaluate(student, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight)
    test.update(names=[data.names[i] for i in split["test"]], train_seconds=run["train_seconds"])
    ckpt = kd.make_checkpoint("student", student, args, data, split, parameters=count_parameters(student),
                              teacher=args.teacher, teacher_parameters=n_teacher,
                              epoch=run["best_epoch"], history=run["history"], val=run["best_val"], test=test,
                              stopped=run["stopped"],
                              precision=kd.precision_name(dtype), machine=kd.machine_name(device), tag=tag)
    kd.finish(args, ckpt, run["stopped"])
    print(f"student test ({len(split['test'])} images, fold {args.fold}): Dice {100 * test['dice']:.2f} "
          f"+- {100 * test['dice_std']:.2f}; best epoch {run['best_epoch']}; "
          f"trained {kd.fmt_time(run['train_seconds'])}; saved {args.out}")
    return ckpt


def class_indices(teacher, data, device):
    """For class teachers: each image's index into their members, on the device (else None)."""
    if not isinstance(teacher, ClassTeachers):
        return None
    return torch.as_tensor([teacher.classes.index(c) if c in teacher.classes else -1 for c in data.labels],
                           device=device)


def evaluate_teacher(teacher, data, split, device, dtype, args):
    """Test metrics of the teacher. Class teachers are each tested on their class's test images
    (routed by the true class, which only they are given), and the per-image Dice put together."""
    images, masks = data.images.to(device), data.masks.to(device)
    if not isinstance(teacher, ClassTeachers):
        return kd.evaluate(teacher, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight)
    dice = {}
    for c, member in zip(teacher.classes, teacher.members):
        mine = [i for i in split["test"] if data.labels[i] == c]
        if mine:
            dice.update(zip(mine, kd.evaluate(member, images, masks, mine, device, dtype, args.batch_size)["per_image_dice"]))
    per_image = [dice[i] for i in split["test"] if i in dice]
    return dict(dice=sum(per_image) / len(per_image), per_image_dice=per_image)


def student_alone(args, teacher, data, split, device, dtype, paths):
    """The student alone on the same split: a finished checkpoint with the same options is reused."""
    alone = copy.copy(args)
    alone.pathway, alone.resume = "none", False
    alone.out = os.path.join(os.path.dirname(args.out), "student_alone.pt")
    tag = run_tag(alone, data, split, paths)
    if os.path.isfile(alone.out):
        ckpt = kd.load_checkpoint(alone.out, "student", "student alone")
        if ckpt.get("tag") == tag:
            print(f"student alone: reusing {alone.out} (same split and options)")
            return ckpt
        print(f"student alone: {alone.out} was trained with other options or another split; training it again")
    print("\n--- the student alone, for comparison")
    kd.seed_everything(kd.run_seed(args.seed, args.fold))  # the same initial weights as the distilled student
    return train(alone, teacher, count_parameters(teacher), data, split, device, dtype, tag)


# ----------------------------------------------------------------------------- 3. the report

def report(teacher_test, n_teacher, students):
    """The table that shows what distillation did: teacher, student alone, distilled student."""
    dice = lambda r: 100 * r["dice"]
    rows = [("teacher", n_teacher, teacher_test)] + [(name, c["parameters"], c["test"]) for name, c in students]
    w = max(len(name) for name, _, _ in rows) + 2
    print(f"\n{'':{w}s}{'parameters':>10s}  {'test Dice':>9s}")
    for name, n, r in rows:
        print(f"{name:{w}s}{kd.fmt_params(n):>10s}  {dice(r):9.2f}")
    if len(students) == 2:
        (_, alone), (_, distilled) = students
        gain, lead = dice(distilled["test"]) - dice(alone["test"]), dice(teacher_test) - dice(alone["test"])
        share = (f"{100 * gain / lead:.0f}% of the teacher's lead ({lead:+.2f})" if lead > 0 else
                 f"the teacher does not lead the student alone here ({lead:+.2f}): it has nothing to pass on")
        print(f"distillation: {gain:+.2f} Dice over the student alone, {share}")
    print(f"the student has {n_teacher / students[-1][1]['parameters']:.1f}x fewer parameters than the teacher")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the student's checkpoint, with
    the test metrics of its teacher (or ensemble) added as teacher_test."""
    # 1. The teachers, and the data and split they were trained on
    args, given = kd.parse_args(OPTIONS, __doc__, argv)
    teacher_ckpts, data, split = load_teachers(args, given)
    paths, classes = teacher_paths(args)
    args.out = args.out or os.path.join("out", "student_alone.pt" if args.pathway == "none"
                                        else f"student_{args.pathway}_{args.loss}.pt")
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    if os.path.abspath(args.out) in map(os.path.abspath, paths):
        raise UserError(f"--out {args.out}: that is a teacher's file; choose another name")
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    members = [kd.build_model(t) for t in teacher_ckpts]
    if classes:
        teacher = ClassTeachers(members, classes, args.route).eval()
    else:
        teacher = members[0] if len(members) == 1 else Ensemble(members).eval()
    teacher = kd.to_device(teacher, device).requires_grad_(False)  # eval mode, frozen
    distilling_teacher = fast_model(teacher, device, dtype) if args.fast_teacher else teacher
    widths = "+".join(str(t["model_config"]["width"]) for t in teacher_ckpts)
    print(f"teacher: {kd.fmt_params(count_parameters(teacher))} parameters (width {widths})")

    # 2. The student alone on the same split: trained, or a finished one reused
    students = []
    if args.alone and args.pathway != "none":
        students.append(("student alone", student_alone(args, teacher, data, split, device, dtype, paths)))
        print(f"\n--- the student distilled ({args.pathway})")
    # 3. The student distilled (or alone, with --pathway none), from the same initial weights
    kd.seed_everything(kd.run_seed(args.seed, args.fold))
    ckpt = train(args, distilling_teacher, count_parameters(teacher), data, split, device, dtype,
                 run_tag(args, data, split, paths))
    name = ("student alone" if args.pathway == "none" else "distilled (dckd)" if args.pathway == "dckd"
            else f"distilled ({args.pathway}, {args.loss})")
    students.append((name, ckpt))

    # 4. What distillation did
    teacher_test = evaluate_teacher(teacher, data, split, device, dtype, args)
    report(teacher_test, count_parameters(teacher), students)
    return dict(ckpt, teacher_test=teacher_test)


if __name__ == "__main__":
    kd.run(main)
