"""Distil a tiny U-Net student from a trained teacher; print both test Dices and parameter counts.

    python train_student.py --teacher out/teacher.pt                          # logits, KLD
    python train_student.py --teacher out/teacher.pt --pathway hidden_regressor --loss mse
    python train_student.py --teacher out/teacher.pt --pathway none           # the student alone
    python train_student.py --teacher out/t_seed0.pt,out/t_seed1.pt           # an ensemble of teachers

Pathways (Behboodi et al. 2025): logits = L (output maps), hidden = H (bottleneck attention maps),
hidden_regressor = HR (bottleneck through a trained regressor); none = no teacher signal, the
paper's "Student" row. The loss is alpha * L_distill + (1 - alpha) * L_sup (Eq. I).

The student uses its teacher's data, image size and split, recomputed here and checked against
the split stored in the teacher's checkpoint: a student tested on images its teacher trained on
would be a leak, so a different split is refused. Several teachers (comma-separated) are distilled
as one, the mean of their logits (models.Ensemble); each must have the same split.
"""
import os
import time

import torch

from data import UserError
import kd
from losses import distillation_loss, supervised_loss, total_loss
from models import Ensemble, Regressor, UNet, count_parameters

OPTIONS = [  # (name, default, help[, choices]): every default in one place
    ("teacher", "out/teacher.pt", "teacher checkpoint written by train_teacher.py; several, comma-separated, "
     "are an ensemble: the mean of their logits (logits pathway only)"),
    ("pathway", "logits", "what is distilled: logits (L), hidden (H), hidden_regressor (HR), none (student alone)",
     ["logits", "hidden", "hidden_regressor", "none"]),
    ("loss", "kld", "L_distill: mse (Eq. II) or kld (Eq. III)", ["mse", "kld"]),
    ("alpha", 0.5, "weight of L_distill in Eq. I; L_sup gets 1 - alpha (the paper: 0.5)"),
    ("T", 1.0, "KLD temperature T; the KL is scaled by T^2 (the paper gives none: 1)"),
    ("teacher_flip", False, "distil the mean of the teacher's outputs on the image and its mirror image "
     "(a two-view ensemble: a stronger, smoother signal for the same teacher)"),
    ("width", 10, "student U-Net width w, levels w..16w: 10 = 0.76M params (the paper: 0.82M)"),
    ("aug", "strong", "student's augmentation (the teacher sees the same augmented batch)",
     ["none", "weak", "strong"]),
    ("epochs", 100, "most epochs (the paper: 500)"),
    ("patience", 20, "early stopping: epochs without a better validation loss (the paper: 50)"),
    ("batch_size", 16, "images per step (the paper: 64)"),
    ("lr", 1e-4, "Adam learning rate (the paper: 1e-4)"),
    ("dice_weight", 0.0, "weight of an added soft-Dice term in L_sup (the paper: 0)"),
    ("seed", 0, "seed of weights, batch order and augmentation"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "mixed precision: auto, bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("compile", False, "torch.compile the training forward passes (faster on GPUs after a warm-up)"),
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
]
SPLIT_OPTIONS = ["classes", "size", "folds", "fold", "val_fraction", "data_seed", "phantom_count"]
PHANTOM_DEMO = dict(epochs=10, batch_size=8)  # a CPU minute or two, on the phantom


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the checkpoint's contents."""
    args, given = kd.parse_args(OPTIONS, __doc__, argv)
    paths = [p for p in args.teacher.split(",") if p]
    tcks = [kd.load_checkpoint(p, "teacher") for p in paths]
    if len(tcks) > 1 and args.pathway in ("hidden", "hidden_regressor"):
        raise UserError(f"--pathway {args.pathway}: an ensemble of teachers has no common bottleneck "
                        "(their channels do not correspond); distil its logits: --pathway logits")
    targs = tcks[0]["args"]
    for k in SPLIT_OPTIONS:  # the teacher's split, or a clear refusal
        if getattr(args, k) is not None and getattr(args, k) != targs[k]:
            raise UserError(f"--{k} {getattr(args, k)}: teacher {paths[0]} was trained with --{k} {targs[k]}; "
                            f"a student must use its teacher's split (train a teacher with --{k} {getattr(args, k)})")
        setattr(args, k, targs[k])
    args.data = args.data or targs["data"]
    kd.choose_data(args, given, PHANTOM_DEMO)
    args.out = args.out or os.path.join("out", "student_alone.pt" if args.pathway == "none"
                                        else f"student_{args.pathway}_{args.loss}.pt")
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    if os.path.abspath(args.out) in map(os.path.abspath, paths):
        raise UserError(f"--out {args.out}: that is a teacher's file; choose another name")
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    kd.seed_everything(args.seed)
    data, split = kd.load_split_data(args)
    named_split = {k: [data.names[i] for i in v] for k, v in split.items()}
    for path, t in zip(paths, tcks):
        if named_split != t["split"]:
            raise UserError(f"--teacher {path}: its stored split differs from the one made here from "
                            f"--data {args.data}; use the data and split the teacher was trained on")
        if data.fingerprint() != t["data_fingerprint"]:
            raise UserError(f"--data {args.data}: the images differ from those teacher {path} was trained on "
                            f"(same names, other pixels); use the teacher's data")
    images, masks = data.images.to(device), data.masks.to(device)

    teachers = [kd.build_model(t) for t in tcks]
    teacher = teachers[0] if len(teachers) == 1 else Ensemble(teachers).eval()
    teacher = kd.to_device(teacher, device).requires_grad_(False)  # eval mode, frozen
    student = kd.to_device(UNet(args.width), device)
    params = list(student.parameters())
    regressor = None
    if args.pathway == "hidden_regressor":  # trains with the student; not counted in it, not saved
        regressor = kd.to_device(Regressor(student.feature_channels["bottleneck"],
                                           teacher.feature_channels["bottleneck"]), device)
        params += list(regressor.parameters())
    n_teacher, n_student = count_parameters(teacher), count_parameters(student)
    widths = "+".join(str(t["model_config"]["width"]) for t in tcks)
    print(f"teacher: {kd.fmt_params(n_teacher)} parameters (width {widths}); "
          f"student: {kd.fmt_params(n_student)} parameters (width {args.width}); "
          f"distilling {args.pathway}" + ("" if args.pathway == "none" else f" with {args.loss}")
          + f"; device {device}, precision {kd.precision_name(dtype)}")

    student_fwd, teacher_fwd = kd.maybe_compile(student, args.compile), kd.maybe_compile(teacher, args.compile)

    def step(x, y):
        s_logits, s_feats = student_fwd(x, return_features=True)
        l_sup = supervised_loss(s_logits.float(), y, args.dice_weight)
        if args.pathway == "none":
            return dict(loss=l_sup)
        with torch.no_grad():
            t_logits, t_feats = teacher_fwd(x, return_features=True)
            if args.teacher_flip:  # the mirror image's outputs, mirrored back, averaged in
                m_logits, m_feats = teacher_fwd(x.flip(-1), return_features=True)
                t_logits = (t_logits + m_logits.flip(-1)) / 2
                t_feats = {k: (v + m_feats[k].flip(-1)) / 2 for k, v in t_feats.items()}
        l_kd = distillation_loss(args.pathway, args.loss, s_logits, s_feats, t_logits, t_feats, regressor, args.T)
        return dict(loss=total_loss(l_kd, l_sup, args.alpha), sup=l_sup, kd=l_kd)

    meta = dict(parameters=n_student, teacher=args.teacher, teacher_parameters=n_teacher)

    def save(epoch, val):
        meta.update(epoch=epoch, val=val)
        ckpt = kd.make_checkpoint("student", student, args, data, split, **meta)
        kd.save_checkpoint(args.out, ckpt)
        return ckpt

    t0 = time.time()
    best_epoch, best_state, stopped = kd.fit(student, images, masks, split, step, args, device, dtype, save, params)
    train_time = time.time() - t0
    student.load_state_dict(best_state)
    names = [data.names[i] for i in split["test"]]
    results = {}
    for who, model in (("teacher", teacher), ("student", student)):
        results[who] = kd.evaluate(model, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight)
        results[who]["names"] = names
    results["student"]["train_seconds"] = train_time
    meta.update(test=results["student"], teacher_test=results["teacher"], stopped=stopped)
    ckpt = save(best_epoch, meta["val"])  # the best weights again, now with their test metrics
    print(f"test ({len(names)} images, fold {args.fold}):")
    for who, n in (("teacher", n_teacher), ("student", n_student)):
        r = results[who]
        print(f"  {who:8s} {kd.fmt_params(n):>7s} parameters  Dice {100 * r['dice']:5.2f} +- {100 * r['dice_std']:5.2f}"
              f"  IoU {100 * r['iou']:5.2f}")
    print(f"  the student has {n_teacher / n_student:.1f}x fewer parameters; best epoch {best_epoch}; "
          f"trained {kd.fmt_time(train_time)}; saved {args.out}")
    return ckpt


if __name__ == "__main__":
    kd.run(main)
