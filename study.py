"""Reproduce the main paper's Table 4: every distillation pathway x loss x teacher augmentation,
over the folds of the k-fold split and over seeds, with the gain of each row over the student alone
and its 95% interval. One command:

    python study.py                               # BUSI at data/Dataset_BUSI_with_GT, else the phantom
    python study.py --fold_list 0 --rows Teacher,Student,L_KLD_WAug --epochs 20
    python study.py --seeds 0,1,2                 # every row 3 times per fold: the spread over retraining
    python study.py --schedule constant --lr 1e-4 --epochs 500 --patience 50 --batch_size 64 --select loss \
                    --teacher_width 112           # the paper's scale and schedule

Per fold and seed it trains two teachers (train_teacher.py --aug strong and --aug weak), then the
student alone and twelve distilled students (train_student.py), each row from the teacher its name
says: _WAug rows from the weak one. Every finished run leaves its checkpoint and one small JSON
record in the study folder (out/study/fold0/seed0/L_KLD.json, .pt). A run whose record is there is
not run again, and a run cut short goes on from its saved state, so a killed study goes on where it
stopped: run the same command again. A teacher is trained again only when one of its students must
run and its checkpoint is gone; its students' records name the teacher checkpoint they were made
from (sha1), and those made from another one run again. A second process may run the same command on
the same folder (another GPU, or one more core: OMP_NUM_THREADS=1 for each): each run is taken by
one of them, and a process whose remaining runs the other holds waits for them. The records alone
(no checkpoints) are enough to print the table. At the end it writes table.md (printed too),
results.json and pictures.png into the study folder. With --ensembles it trains nothing and asks
whether a teacher could know more: each teacher row against the mean-logits ensemble of its seeds
and against itself on the image and its mirror image (ensembles_fold<F>_seed<S>.json, named by the
folds and seeds). With --trend out/w4,out/w6,out/w10 it trains nothing and prints the student-size
trend from those study folders' results.json (one student width each, each trained for its own
--epochs): Dice against parameters, with intervals. The teachers do not depend on the student's width:
copy fold*/seed*/Teacher*.json and .pt from one such folder into the next, and its study, called with
the same teacher options (--teacher_epochs among them when the student's --epochs differ), trains only
the students.
"""
import argparse
import glob
import json
import math
import os
import shlex
import socket
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import UserError, load_data, near_duplicate_groups
import kd
import runs
import train_student
import train_teacher
from models import Ensemble, Mirrored

DEFAULTS = dict(  # every default in one place
    data=runs.DEFAULT_DATA,
    classes="benign,malignant",
    folds=3,
    fold_list="all",
    rows="all",
    size=224,
    phantom_count=240,
    data_seed=0,
    val_fraction=0.15,
    near_dup=0.95,
    teacher_width=64,
    student_width=10,
    teacher_epochs=0,  # 0: --epochs
    epochs=120,  # BUSI at 96 px, cosine at 1e-3: 60 -> 120 still gained, 120 -> 240 did not (results/plateau)
    patience=120,  # no early stop: the last epochs, at the smallest rates, are where a run settles
    batch_size=16,
    lr=0.001,
    schedule="cosine",  # the paper: constant 1e-4, which leaves runs improving at their last epoch
    warmup=3,
    select="last",  # the cosine's end beat the lowest-val-loss epoch in 29 of 45 probes (results/plateau)
    alpha=0.5,
    T=1.0,
    dckd_level="bottleneck",
    seeds="0",
    device="auto",
    amp="auto",
    compile=False,
    n_perm=10000,
    perm_seed=0,
    table_only=False,
    ensembles=False,
    trend="",
    pictures=4,
    out="out/study",
)
# When no BUSI is present: a small study of the phantom, short runs.
PHANTOM_DEMO = dict(size=64, phantom_count=120, epochs=20, batch_size=8, teacher_width=16, student_width=8)


def options():
    """The command line, in plain argparse; the defaults are DEFAULTS."""
    p = runs.parser(__doc__, DEFAULTS)
    add = p.add_argument
    add("--data", help="BUSI folder, a folder with images/ and masks/, or 'phantom'")
    add("--classes", help="BUSI classes to use, comma-separated")
    add("--folds", type=int, help="k of the k-fold split (the paper: 3-fold cross-validation)")
    add("--fold_list", help="which folds to run, e.g. 0,2 (default: all of them)")
    add("--rows", help="which rows to run, e.g. Student,L_KLD,L_KLD_WAug; Teacher and Student always run (the "
        "p-values compare against them)")
    add("--size", type=int, help="images are resized to size x size (the paper: 224)")
    add("--phantom_count", type=int, help="number of phantom images")
    add("--data_seed", type=int, help="seed of the split (and of the phantom)")
    add("--val_fraction", type=float, help="share of the training part held out for validation: the kept epoch, early "
        "stopping")
    add("--near_dup", type=float, help="thumbnail correlation above which images are near-copies, kept on one side "
        "of the split (0: exact copies only)")
    add("--teacher_width", type=int, help="teacher U-Net width: 64 = 31.0M params, 112 = 95.0M (the paper's scale)")
    add("--student_width", type=int, help="student U-Net width: 10 = 0.76M params (the paper: 0.82M)")
    add("--epochs", type=int, help="most epochs of every run (the paper: 500)")
    add("--teacher_epochs", type=int, help="most epochs of the teachers' runs, when they need longer than their "
        "students to stop improving (0: --epochs)")
    add("--patience", type=int, help="early stopping patience of every run: epochs without a better --select score (the "
        "paper: 50)")
    add("--batch_size", type=int, help="images per step (the paper: 64)")
    add("--lr", type=float, help="Adam's peak learning rate (the paper: 1e-4, constant)")
    add("--schedule", choices=["constant", "cosine"], help="learning rate over a run: constant (the paper) or cosine "
        "(warm-up, then cosine decay)")
    add("--warmup", type=int, help="epochs of linear warm-up of the cosine schedule")
    add("--select", choices=["last", "loss", "dice"], help="which epoch's weights a run keeps: the last (the end of "
        "the cosine decay), lowest validation loss (the paper) or highest validation Dice")
    add("--alpha", type=float, help="weight of L_distill in Eq. I (the paper: 0.5)")
    add("--T", type=float, help="KLD temperature (the paper gives none: 1)")
    add("--dckd_level", choices=["enc4", "bottleneck", "dec4", "dec3"], help="the DCKD row's feature level: at the "
        "bottleneck (1/16 of the side) a small lesion may cover no position, and its image gives no anchor")
    add("--seeds", help="seeds, e.g. 0,1,2: every row runs once per fold and seed; within one fold and seed, rows "
        "differ only in what they distil (same initial student, same batches)")
    add("--device", help="auto (cuda, then mps, then cpu), or a torch device")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision: auto, bf16, fp16 or off (fp32)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the training forward passes")
    add("--n_perm", type=int, help=f"random sign flips of the permutation test when there are more than {EXACT_UP_TO} "
        "pairs")
    add("--perm_seed", type=int, help="seed of those sign flips")
    add("--table_only", action=argparse.BooleanOptionalAction, help="train nothing: print the table from the records "
        "already in --out (a part of the runs, or all of them)")
    add("--ensembles", action=argparse.BooleanOptionalAction, help="train nothing: with the checkpoints of every "
        "seed in --out, test each teacher (and the student alone) against the mean-logits ensemble of its "
        "seeds and its mirrored self; writes ensembles_fold<F>_seed<S>.json")
    add("--trend", help="train nothing: study folders of one data set at different --student_width, comma-separated; "
        "print the student alone and the best distilled row (chosen on validation) of each against its parameters")
    add("--pictures", type=int, help="test images of the first fold shown in pictures.png (0: no picture)")
    add("--out", help="the study folder: runs, checkpoints, table.md, results.json, pictures.png")
    return p

# ----------------------------------------------------------------------------- the rows of Table 4

PATHWAYS = {"L": "logits", "H": "hidden", "HReg": "hidden_regressor"}  # the paper's names -> ours
ROWS = {"Teacher": dict(aug="strong"), "Teacher_WAug": dict(aug="weak"),
        "Teacher_benign": dict(aug="strong", only_class="benign"),        # T2KD's class teachers
        "Teacher_malignant": dict(aug="strong", only_class="malignant"),
        "Student": dict(teacher="Teacher", pathway="none")}
for _p, _pathway in PATHWAYS.items():
    for _loss in ("MSE", "KLD"):
        for _waug in ("", "_WAug"):  # the paper's order: L_MSE, L_MSE_WAug, L_KLD, ...
            ROWS[f"{_p}_{_loss}{_waug}"] = dict(teacher="Teacher" + _waug, pathway=_pathway, loss=_loss.lower())
CLASS_TEACHERS = {"benign": "Teacher_benign", "malignant": "Teacher_malignant"}
ROWS.update({  # the two other methods, our readings of their papers (train_student.py's docstring)
    "T2KD": dict(teachers=CLASS_TEACHERS, pathway="joint", loss="kld", sup="wb"),
    "T2KD_noWB": dict(teachers=CLASS_TEACHERS, pathway="joint", loss="kld", sup="ce"),
    "DCKD": dict(teacher="Teacher", pathway="dckd"),
    "L_CWD": dict(teacher="Teacher", pathway="logits", loss="cwd"),  # channel-wise distillation (Shu et al. 2021)
    "L_CWD_WAug": dict(teacher="Teacher_WAug", pathway="logits", loss="cwd"),
})
# A stronger teacher for the paper's best row: the mean logits of Teacher_WAug's seeds 0, 1 and 2 of
# the same fold (models.Ensemble). It runs only when --seeds holds those three.
ENSEMBLE_SEEDS = (0, 1, 2)
ROWS["L_KLD_WAug_Ens3"] = dict(teacher="Teacher_WAug", ensemble=ENSEMBLE_SEEDS, pathway="logits", loss="kld")
EXTRA_ROWS = {"Teacher_WAug", "Teacher_benign", "Teacher_malignant", "T2KD", "T2KD_noWB", "DCKD", "L_CWD", "L_CWD_WAug",
              "L_KLD_WAug_Ens3"}  # not in Table 4
DISTILLED = [r for r in ROWS if "pathway" in ROWS[r] and ROWS[r]["pathway"] != "none"]
PAPER = {  # Table 4 of Behboodi et al. 2025, Dice %, mean (+- std) over 3 folds of UDIAT
    "Teacher": "81.50 ± 18.40", "Student": "73.16 ± 23.78", "L_MSE": "77.75", "L_MSE_WAug": "77.52",
    "L_KLD": "78.00", "L_KLD_WAug": "80.00 ± 18.86", "H_MSE": "77.50", "H_MSE_WAug": "77.85", "H_KLD": "79.00",
    "H_KLD_WAug": "78.50", "HReg_MSE": "78.06", "HReg_MSE_WAug": "77.63", "HReg_KLD": "79.00",
    "HReg_KLD_WAug": "79.31", "T2KD": "83.59 (BUSI, 2.2M, own split)", "DCKD": "+7 over its student (3D ABUS)",
}
# Options a study may change between calls: runs.NEUTRAL_OPTIONS, and amp (a study checks its precision itself)
NEUTRAL_OPTIONS = runs.NEUTRAL_OPTIONS | {"amp"}
BEFORE = {"schedule": "constant", "select": "loss", "near_dup": "0.0"}  # what runs recorded before these options had


def teachers_of(row):
    """The teacher rows a student row learns from (none for a teacher)."""
    spec = ROWS[row]
    return list(spec["teachers"].values()) if "teachers" in spec else [spec["teacher"]] if "teacher" in spec else []


def teacher_runs(row, seed):
    """The (teacher row, seed) runs of one fold that a student row of `seed` learns from: its
    teachers of the same seed, or for an ensemble row its teacher of every ENSEMBLE_SEEDS."""
    seeds = ROWS[row].get("ensemble", (seed,))
    return [(t, s) for t in teachers_of(row) for s in seeds]


def teachers_epochs(options):
    """The teachers' most epochs under a study's options (a dict): --teacher_epochs, or --epochs when 0."""
    return options.get("teacher_epochs") or options.get("epochs")


def run_argv(row, fold, seed, args):
    """The exact command-line words of one run: everything explicit, so no script default (nor the
    scripts' phantom quick-demo settings) decides anything behind the study's back."""
    spec, folder = ROWS[row], run_folder(args, fold, seed)
    epochs = teachers_epochs(vars(args)) if "aug" in spec else args.epochs
    common = ["--epochs", epochs, "--patience", args.patience, "--batch_size", args.batch_size,
              "--lr", args.lr, "--schedule", args.schedule, "--select", args.select, "--seed", seed,
              "--device", args.device, "--amp", args.amp] + (["--warmup", args.warmup] if args.schedule == "cosine" else [])
    if "aug" in spec:  # a teacher
        argv = ["--data", args.data, "--classes", args.classes, "--size", args.size, "--folds", args.folds,
                "--fold", fold, "--val_fraction", args.val_fraction, "--near_dup", args.near_dup, "--data_seed", args.data_seed,
                "--phantom_count", args.phantom_count, "--width", args.teacher_width, "--aug", spec["aug"]] + common
        argv += ["--only_class", spec["only_class"]] if "only_class" in spec else []
    else:  # a student: data and split come from its teacher's checkpoint
        ckpt = lambda name, s=seed: os.path.join(run_folder(args, fold, s), name + ".pt")
        argv = (["--class_teachers", ",".join(f"{c}={ckpt(t)}" for c, t in spec["teachers"].items())]
                if "teachers" in spec else ["--teacher", ",".join(ckpt(t, s) for t, s in teacher_runs(row, seed))])
        argv += ["--data", args.data, "--pathway", spec["pathway"]] + (["--loss", spec["loss"]] if "loss" in spec else [])
        argv += ["--sup", spec["sup"]] if "sup" in spec else []
        argv += ["--dckd_level", args.dckd_level] if spec["pathway"] == "dckd" else []
        argv += ["--alpha", args.alpha, "--T", args.T, "--width", args.student_width, "--aug", "strong",
                 "--no-alone"] + common
    argv += ["--out", os.path.join(folder, row + ".pt")] + (["--compile"] if args.compile else [])
    return [str(w) for w in argv]


def run_folder(args, fold, seed):
    return os.path.join(args.out, f"fold{fold}", f"seed{seed}")


def _what(argv):
    """The options of an argv that decide its result (not where or how fast it runs)."""
    pairs, key = {}, None
    for w in argv:
        if w.startswith("--"):
            key = w[2:]
            pairs[key] = True
        elif key is not None:
            pairs[key] = w
    for k, v in BEFORE.items():
        if k != "near_dup" or "aug" in pairs:  # only a teacher's run makes the split
            pairs.setdefault(k, v)
    if pairs.get("pathway") == "dckd":  # DCKD runs from before --dckd_level: the bottleneck
        pairs.setdefault("dckd_level", "bottleneck")
    return {k: v for k, v in pairs.items() if k not in NEUTRAL_OPTIONS}


def teacher_sha1(row, seed, teacher_recs):
    """Which exact teacher checkpoints a student row learns from: their sha1s, joined by '+'.
    teacher_recs: {(teacher row, seed): record} of the fold."""
    return "+".join(teacher_recs[k]["sha1"] for k in teacher_runs(row, seed))


def stored(row, fold, seed, args, teacher_recs=None, say=True):
    """The finished record of one run, or None when it must run: no record yet, or (a student) its
    record was made from other teacher checkpoints than those `teacher_recs` describe."""
    path = os.path.join(run_folder(args, fold, seed), row + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    old, new = _what(rec["argv"]), _what(run_argv(row, fold, seed, args))
    if old != new:
        diff = ", ".join(f"--{k} {old.get(k)} (now {new.get(k)})" for k in sorted(old.keys() | new.keys())
                         if old.get(k) != new.get(k))
        raise UserError(f"{path}: made with other options: {diff}; give another --out, or delete the file to run it again")
    if teacher_recs is not None and rec.get("teacher_sha1") != teacher_sha1(row, seed, teacher_recs):
        if say:
            print(f"{path}: made from another {' or '.join(teachers_of(row))} checkpoint: running it again")
        return None
    return rec


def train_one(row, fold, seed, args, label, precision, teacher_recs=None):
    """Train one run (going on with its unfinished state if there is one) and write its record."""
    folder = run_folder(args, fold, seed)
    ckpt_path, json_path = os.path.join(folder, row + ".pt"), os.path.join(folder, row + ".json")
    if precision not in args.precisions_seen:
        raise UserError(f"{args.out}: its runs ran in {', '.join(sorted(args.precisions_seen))}, this call would run "
                        f"{row} fold {fold} seed {seed} in {precision}; give the --device and --amp of those runs, "
                        f"or another --out")
    argv = run_argv(row, fold, seed, args)
    script = train_teacher if "aug" in ROWS[row] else train_student
    print(f"\n=== {label} fold {fold} seed {seed} {row}: python {script.__name__}.py {shlex.join(argv)}", flush=True)
    try:
        try:
            ckpt = script.main(argv + (["--resume"] if os.path.isfile(runs.state_path(ckpt_path)) else []))
        except UserError as e:
            if not str(e).startswith("--resume"):
                raise
            print(f"cannot go on with the unfinished run ({e}): starting it afresh")
            ckpt = script.main(argv)
    except FloatingPointError as e:
        raise FloatingPointError(f"fold {fold} seed {seed} {row}: {e}") from None
    if ckpt["stopped"] == "interrupted":  # the script went on with its best weights after Ctrl-C;
        raise KeyboardInterrupt            # the study must not record such a cut-short run as finished
    t, v = ckpt["test"], ckpt["val"]
    rec = dict(row=row, fold=fold, seed=seed, dice=t["dice"], dice_std=t["dice_std"], iou=t["iou"],
               iou_std=t["iou_std"], val_dice=v["dice"], val_loss=v["loss"], per_image_dice=t["per_image_dice"],
               per_image_iou=t["per_image_iou"], names=t["names"], parameters=ckpt["parameters"],
               train_seconds=t["train_seconds"], epoch=ckpt["epoch"], stopped=ckpt["stopped"],
               precision=ckpt["precision"], machine=ckpt["machine"], data_fingerprint=ckpt["data_fingerprint"],
               sha1=runs.file_hash(ckpt_path), script=script.__name__ + ".py", argv=argv, checkpoint=ckpt_path,
               versions=ckpt["versions"], history=ckpt["history"])
    if teacher_recs is not None:
        rec["teacher_sha1"] = teacher_sha1(row, seed, teacher_recs)
    runs.write_json(json_path, rec)
    return rec


def one_pass(f, seeds, teachers, students, args, precision, records, ran, label):
    """Fold f, seed by seed: the teachers to train, then their students; ensemble rows when every
    seed's teachers are there. Finished records go into `records`, what this call trained into `ran`.
    Returns the runs (row, fold, seed) another study process holds (see claim), empty when all is
    done; a student whose teacher the other process holds is left for the next pass."""
    t_recs = {(t, s): stored(t, f, s, args) for t in teachers for s in seeds}  # this fold's teachers
    # The teachers to train (again): those without a record, and those whose checkpoint is gone
    # while a student still to run needs it. A teacher trained again makes every student made
    # from it run again, and such a student may need more gone checkpoints (an ensemble row
    # needs every seed's teacher): grow the set until it stops growing.
    gone = lambda k: not os.path.isfile(os.path.join(run_folder(args, f, k[1]), k[0] + ".pt"))
    retrain = {k for k, rec in t_recs.items() if rec is None}
    while True:
        pending = [(r, s) for r in students for s in seeds if set(teacher_runs(r, s)) & retrain
                   or stored(r, f, s, args, t_recs, say=False) is None]
        more = {k for r, s in pending for k in teacher_runs(r, s) if gone(k)} - retrain
        if not more:
            break
        retrain |= more
    held = []  # the runs another process holds

    def run(row, s):  # train one run unless another process holds it (then None); its record
        if not claim(row, f, s, args):
            held.append((row, f, s))
            return None
        try:  # the other process may have finished it since this pass looked
            teacher = "aug" in ROWS[row]
            parents = None if teacher else t_recs  # a student's record names its teachers' checkpoints
            rec = stored(row, f, s, args, parents, say=False)
            if rec is None or (teacher and gone((row, s))):
                rec = train_one(row, f, s, args, label(), precision, parents)
                ran.append((row, f, s))
            return rec
        finally:
            release(row, f, s, args)

    for s in seeds + [None]:
        for t in (teachers if s is not None else []):
            if (t, s) in retrain:
                t_recs[t, s] = run(t, s)
            elif is_held(t, f, s, args):  # the other process is training it again: not yet to learn from
                held.append((t, f, s))
                t_recs[t, s] = None
            if t_recs[t, s] is not None:
                records[t, f, s] = t_recs[t, s]
        for r, s_ in [(r, s_) for r in students for s_ in (seeds if s is None else [s])
                      if ("ensemble" in ROWS[r]) == (s is None)]:
            if any(t_recs[k] is None for k in teacher_runs(r, s_)):
                continue  # its teacher is held: the next pass
            rec = stored(r, f, s_, args, t_recs)
            if rec is None:
                rec = run(r, s_)
            if rec is not None:
                records[r, f, s_] = rec
    return held


# ----------------------------------------------------------------------------- two processes, one study
# A second process started with the same command on the same --out (on another GPU; or on a CPU, each
# process with OMP_NUM_THREADS=1) takes the runs the first has not. A run is held by the process that
# holds the OS lock (flock) of a lock file beside its checkpoint. The OS lets go of that lock when its
# process ends, however it ends (Ctrl-C, kill, a lost machine), so a run is never left held by no one.

WAIT_SECONDS = 30  # how often a process whose remaining runs the other holds looks again
_HELD = {}  # lock file -> its open descriptor, for the runs this process holds

if os.name == "nt":
    import msvcrt

    def _try_lock(fd):
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
else:
    import fcntl

    def _try_lock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def lock_path(row, fold, seed, args):
    return os.path.join(run_folder(args, fold, seed), row + ".lock")


def claim(row, fold, seed, args):
    """Take one run for this process: lock its lock file. False when another process holds it."""
    path = lock_path(row, fold, seed, args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
        if not _try_lock(fd):
            os.close(fd)
            return False
        try:  # the holder removes the file as it lets go: a lock on a removed file holds nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # for the waiting message
    _HELD[path] = fd
    return True


def release(row, fold, seed, args):
    path = lock_path(row, fold, seed, args)
    try:
        os.remove(path)  # before letting go, so that no one locks a file about to go
    except OSError:
        pass  # Windows keeps an open file: it stays, and unlocked it holds nothing
    os.close(_HELD.pop(path))  # closing lets go of the lock


def is_held(row, fold, seed, args):
    """Whether another process holds a run now (asking takes its lock for a moment, if it is free)."""
    try:
        fd = os.open(lock_path(row, fold, seed, args), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


def holder(row, fold, seed, args):
    """Who holds a run, for a message: 'process PID on HOST'."""
    try:
        with open(lock_path(row, fold, seed, args)) as fh:
            pid, host = fh.read().split()
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def wait_for(held, args):
    """Sleep until one of the held runs is no longer held (finished, or its process ended)."""
    while all(is_held(*k, args) for k in held):
        time.sleep(WAIT_SECONDS)


# ----------------------------------------------------------------------------- the paired test

EXACT_UP_TO = 20  # pairs up to which the permutation test enumerates every sign pattern


def paired_permutation_test(a, b, n_perm=10000, seed=0):
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0; returns the p-value.

    d_i = a_i - b_i. Under the null hypothesis each difference is as likely to have had the other
    sign, so the observed |mean(d)| is compared with |mean(s * d)| over sign patterns s in {-1, 1}^n:
      n <= 20: all 2^n patterns (the observed one among them), p = #{s : |mean(s*d)| >= |mean(d)|} / 2^n;
      n > 20:  n_perm random patterns (numpy, fixed seed), p = (#{|mean(s*d)| >= |mean(d)|} + 1) / (n_perm + 1),
               the +1 counting the observed pattern, so p is never 0 (Phipson & Smyth 2010).
    Identical inputs give p = 1; no pairs give p = 1 (the one empty pattern).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"a and b must be two 1-D sequences of equal length, got shapes "
                         f"{np.shape(a)} and {np.shape(b)}")
    observed = abs(d.sum())  # |sum| ranks patterns exactly as |mean| does: n is the same for all
    tol = 1e-9 * max(1.0, observed)  # sums added in another order differ in the last bits
    if len(d) <= EXACT_UP_TO:
        sums = np.zeros(1)
        for x in d:  # every sign pattern's sum, built one difference at a time: 2^n values
            sums = np.concatenate([sums + x, sums - x])
        return float(np.mean(np.abs(sums) >= observed - tol))
    rng, count = np.random.default_rng(seed), 0
    for start in range(0, n_perm, 1000):  # in chunks: n_perm x n signs need not fit in memory
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n_perm - start), len(d)))
        count += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (count + 1) / (n_perm + 1)


# ----------------------------------------------------------------------------- the table

def summarise(records, rows, n_perm, perm_seed, groups=None):
    """records: {(row, fold, seed): record} -> one dict per row. Per row: the mean and spread of
    Dice over its runs (fold x seed); its gain over the student alone, paired by fold and seed, with
    a 95% t interval over those pairs and its means per fold and per seed; for a distilled row, the
    share of its teacher's lead it recovers on the same pairs, with Fieller's interval;
    per-image permutation p-values against Teacher and Student alone (`groups`: {image name: its
    group of near-copies}, each group one unit of that test)."""
    def runs_of(row):
        return {(f, s): r for (r_, f, s), r in records.items() if r_ == row}

    def dice_on(rec, names):  # a run's mean Dice over some of its test images (a class teacher's)
        if set(names) == set(rec["names"]):
            return rec["dice"]
        own = dict(zip(rec["names"], rec["per_image_dice"]))
        return float(np.mean([own[n] for n in names]))

    def differences(row, base="Student", keys=None):  # (fold, seed) -> row minus base, on the row's images
        mine, theirs = runs_of(row), runs_of(base)
        keys = sorted(mine.keys() & theirs.keys()) if keys is None else [k for k in keys if k in mine and k in theirs]
        return {k: mine[k]["dice"] - dice_on(theirs[k], mine[k]["names"]) for k in keys}

    out = {}
    for row in rows:
        recs = list(runs_of(row).values())
        if not recs:
            continue
        dice = [r["dice"] for r in recs]
        s = dict(runs=len(recs), folds=sorted({r["fold"] for r in recs}), seeds=sorted({r["seed"] for r in recs}),
                 dice_mean=float(np.mean(dice)), dice_std=float(np.std(dice, ddof=1)) if len(dice) > 1 else None,
                 val_dice_mean=float(np.mean([r["val_dice"] for r in recs])),
                 iou_mean=float(np.mean([r["iou"] for r in recs])), parameters=recs[0]["parameters"],
                 train_seconds=float(sum(r["train_seconds"] for r in recs)),
                 precision=sorted({r["precision"] for r in recs}), paper=PAPER.get(row),
                 late_best=sum(late_best(r) for r in recs))
        d = differences(row) if row != "Student" else {}
        s["gain"] = kd.paired_interval(list(d.values())) if d else (None, None, None)
        s["gain_by_fold"] = {f: float(np.mean([v for (f_, _), v in d.items() if f_ == f])) for f in sorted({k[0] for k in d})}
        s["gain_by_seed"] = {x: float(np.mean([v for (_, x_), v in d.items() if x_ == x])) for x in sorted({k[1] for k in d})}
        teacher = ROWS[row].get("teacher", "Teacher")  # class teachers: the lead of the teacher of every class
        if row in DISTILLED and runs_of(teacher) and d:
            lead = differences(teacher, keys=list(d))  # on the row's own pairs: an ensemble row's fold 0 only
            keys = [k for k in d if k in lead]
            lead_interval = kd.paired_interval([lead[k] for k in keys])  # (None, None, None) without pairs
            s["teacher_lead"], s["teacher_lead_interval"] = lead_interval[0], lead_interval
            s["share_of_lead"] = share_interval([d[k] for k in keys], [lead[k] for k in keys])
        for base in ("Teacher", "Student"):
            a, b = per_image_means(records, row, base, groups)
            s[f"p_vs_{base.lower()}"] = (None if row == base or not a else paired_permutation_test(a, b, n_perm, perm_seed))
            s[f"pairs_vs_{base.lower()}"] = len(a) if row != base else 0
        out[row] = s
    return out


def per_image_means(records, row, base, groups=None):
    """Per test image (fold, name): its Dice under `row` and under `base`, each averaged over the seeds
    both ran, so an image tested under three seeds counts once, not three times. With `groups` ({name:
    group}), per group of near-copies instead, the mean of its images': two near-copies are nearly
    one image seen twice, not two pieces of evidence."""
    dice = lambda r_: {(f, n, s): v for (r, f, s), rec in records.items() if r == r_
                       for n, v in zip(rec["names"], rec["per_image_dice"])}
    mine, theirs = dice(row), dice(base)
    images = {}
    for f, n, s in mine.keys() & theirs.keys():
        images.setdefault((f, n), []).append((mine[f, n, s], theirs[f, n, s]))
    means = {k: (np.mean([p[0] for p in v]), np.mean([p[1] for p in v])) for k, v in images.items()}
    units = {}
    for (f, n), m in means.items():
        units.setdefault((f, n if groups is None else groups[n]), []).append(m)
    keys = sorted(units)
    return ([float(np.mean([m[0] for m in units[k]])) for k in keys],
            [float(np.mean([m[1] for m in units[k]])) for k in keys])


def share_interval(gains, leads, level=0.95):
    """The share of the teacher's lead a row recovers, mean(gains) / mean(leads) over paired
    replicates, with Fieller's interval: every share r for which the paired t interval of
    gain - r * lead holds 0. It is exact for normal pairs; a percentile bootstrap over 3 to 9 pairs
    covers the true share far less often than it says (in simulations, 74-90% for "95%").
    Returns (share, low, high); None when the mean lead is not above 0; low and high None when the
    lead's own t interval does not lie above 0 (the set of shares is then unbounded)."""
    g, l = np.asarray(gains, dtype=np.float64), np.asarray(leads, dtype=np.float64)
    if not len(l) or l.mean() <= 0:
        return None
    share = float(g.mean() / l.mean())
    if len(l) < 2:
        return share, None, None
    q = kd.t_quantile(1 - (1 - level) / 2, len(l) - 1) ** 2
    (var_g, cov), (_, var_l) = np.cov(g, l) / len(l)  # of the two means
    # (mean g - r mean l)^2 <= q (var_g - 2 r cov + r^2 var_l): a r^2 - 2 b r + c <= 0
    a, b, c = l.mean() ** 2 - q * var_l, g.mean() * l.mean() - q * cov, g.mean() ** 2 - q * var_g
    if a <= 0:  # the lead's t interval reaches 0
        return share, None, None
    half = math.sqrt(max(0.0, b * b - a * c))  # >= 0 whenever a > 0 (the share lies inside); max: rounding
    return share, float((b - half) / a), float((b + half) / a)


def _p(p, n_perm, exact=False):
    """A p-value as printed; one at the floor of n_perm random sign flips, 1 / (n_perm + 1), as '< 1e-04'
    (only there: an exact test's p, over EXACT_UP_TO pairs or fewer, is printed as it is)."""
    if p is None:
        return "—"
    if not exact and p * (n_perm + 1) <= 1 + 1e-9:
        return f"< {10.0 ** math.ceil(math.log10(p)):.0e}"
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def verdict(gain):
    """What a gain's 95% interval says: above zero, below zero, or too close to call."""
    mean, low, high = gain
    if low is None:
        return "one run: no interval"
    return "above 0" if low > 0 else "below 0" if high < 0 else "too close to call"


def late_best(rec):
    """Whether a run's lowest validation loss came in the last tenth of its schedule: it was still
    improving when it stopped. (Its kept epoch, under --select last, is always the last one.)"""
    history = rec.get("history") or [dict(epoch=rec["epoch"], val_loss=0)]  # records without one: the kept epoch
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    return best > 0.9 * int(_what(rec["argv"]).get("epochs", rec["epoch"]))


def gain_text(gain):
    """A gain (mean, low, high) in Dice points: "+1.23 [-0.50, +2.96]", the mean alone for one pair, "—" for none."""
    mean, low, high = (None if x is None else f"{100 * x:+.2f}" for x in gain)
    return "—" if mean is None else mean + ("" if low is None else f" [{low}, {high}]")


def share_text(share):
    """A share of the teacher's lead (share, low, high), as share_interval returns it: "38% [21%, 62%]",
    the share alone without an interval, "—" for none. Whole percents (round: -0.4% is "0%", not "-0%")."""
    if share is None:
        return "—"
    pct = lambda x: f"{round(100 * x)}%"
    return pct(share[0]) + ("" if share[1] is None else f" [{pct(share[1])}, {pct(share[2])}]")


def full_rows(rows):
    """The distilled rows with as many runs as the student alone: the candidates of chosen_row."""
    return [r for r in DISTILLED if r in rows and "Student" in rows and rows[r]["runs"] == rows["Student"]["runs"]]


def chosen_row(rows):
    """The distilled row a study reports as its test of distillation: the one of highest mean validation
    Dice among full_rows (chosen on validation, never on test); None without the student alone or such a row."""
    full = full_rows(rows)
    return max(full, key=lambda r: rows[r]["val_dice_mean"]) if full else None


def image_groups(args, fingerprint):
    """{image name: its group of near-copies} in the records' data (as the split grouped them), so that
    the per-image test counts each group once; None, with a note, when --data is not that data or
    is not there (the table is then made from the records alone)."""
    try:
        data = load_data(args.data, runs.classes_of(args), args.size, args.phantom_count, args.data_seed)
    except UserError as e:
        print(f"note: {e}; the per-image test counts every image, not each group of near-copies once")
        return None
    if data.fingerprint() != fingerprint:
        print(f"note: --data {args.data} is not the data of the records; the per-image test counts every image")
        return None
    return dict(zip(data.names, near_duplicate_groups(data.thumbnails, data.hashes, args.near_dup)))


def format_table(summary, args, grouped=False):
    """The markdown table of summarise's rows, and what it is: data, folds and seeds of its records.
    grouped: whether the per-image test counted each group of near-copies once."""
    folds = sorted({f for s in summary.values() for f in s["folds"]})
    seeds = sorted({x for s in summary.values() for x in s["seeds"]})
    pct = lambda x: f"{100 * x:.2f}"
    signed = lambda x: f"{100 * x:+.2f}"
    lines = ["| Row | Runs | Dice % (mean ± sd over runs) | Val Dice % | Gain over Student alone [95% CI] "
             "| Verdict | Gain by fold; by seed | Share of teacher's lead [95% CI] | Best epoch in last tenth | Params "
             "| p vs Teacher | p vs Student | Paper Dice % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        name = f"{row}*" if row in EXTRA_ROWS else row
        spread = "" if s["dice_std"] is None else f" ± {pct(s['dice_std'])}"
        g = s["gain"]
        gain = gain_text(g)
        by = lambda means: " / ".join(signed(v) for v in means.values())
        split_gain = "—" if g[0] is None else f"{by(s['gain_by_fold'])}; {by(s['gain_by_seed'])}"
        share = share_text(s.get("share_of_lead"))
        p_vs = lambda base: _p(s[f"p_vs_{base}"], args.n_perm, s[f"pairs_vs_{base}"] <= EXACT_UP_TO)
        lines.append(f"| {name} | {s['runs']} | {pct(s['dice_mean'])}{spread} | {pct(s['val_dice_mean'])} | {gain} "
                     f"| {verdict(g) if g[0] is not None else '—'} | {split_gain} | {share} | {s['late_best']} of {s['runs']} "
                     f"| {runs.fmt_params(s['parameters'])} | {p_vs('teacher')} | {p_vs('student')} | {s['paper'] or '—'} |")
    precisions = sorted({p for s in summary.values() for p in s["precision"]})
    lines += [
        "",
        f"Data: {args.data}, folds {','.join(map(str, folds))} of {args.folds}, seeds {','.join(map(str, seeds))}, "
        f"{args.size}x{args.size}, teacher width {args.teacher_width}, student width {args.student_width}, at most "
        f"{args.epochs} epochs{f' (teachers {args.teacher_epochs})' if args.teacher_epochs else ''} (patience "
        f"{args.patience}), batch {args.batch_size}, lr {args.lr}"
        f"{f', DCKD at the {args.dckd_level} level' if 'DCKD' in summary else ''}; "
        f"precision {', '.join(precisions)}. A run is one fold and one seed; Dice: mean ± sample std over a row's runs "
        f"of each run's mean test Dice; Val Dice: the same on the validation part, which is what rows are chosen by.",
        "Gain: the row's Dice minus the student alone's, paired by fold and seed, mean and 95% t interval over the "
        "pairs, each fold-seed pair taken as a replicate (independent only where runs drew their initial weights "
        "from fold and seed; folds share training images, so the interval is if anything too narrow); beside it the "
        "mean gain of each fold, then of each seed. Verdict: 'above 0' or 'below 0' when the interval excludes 0, "
        "else too close to call. Share of teacher's lead: mean gain / mean lead of its teacher over the student "
        "alone, on the row's own pairs, with its 95% Fieller interval (the shares r for which the t interval of "
        "gain - r x lead over the pairs holds 0; none when the lead is not clearly above 0). Best epoch in last "
        "tenth: runs whose lowest validation loss fell in the last tenth of the schedule, still improving. A class "
        "teacher is tested on its class's test images only, and its gain is over the student alone on those.",
        "p: two-sided paired sign-flip permutation test on per-image test Dice, images matched by fold and name, "
        "each image's Dice averaged over the seeds both rows ran"
        + (f", then over its group of near-copies (--near_dup {args.near_dup}), each group one unit" if grouped else
           ", each image one unit")
        + f" ({args.n_perm} random sign flips with seed {args.perm_seed} above {EXACT_UP_TO} units, else exact; "
        f"'< 1e-04' is the floor of {args.n_perm} flips); it is "
        f"conditional on the trained models (it asks whether these models differ on these images, not whether "
        f"the method does over retraining): read the gain's interval for that. Not corrected for multiple tests.",
    ]
    best = chosen_row(summary)
    if best:
        n, full = sum(r in summary for r in DISTILLED), full_rows(summary)
        among = "" if len(full) == n else f": {', '.join(full)}; {n - len(full)} of {n} rows have fewer runs"
        lines.append(f"Chosen on validation (the distilled row of highest Val Dice among those with as many runs as "
                     f"the student alone{among}): {best}, gain {gain_text(summary[best]['gain'])}, "
                     f"{verdict(summary[best]['gain'])}. It is the table's test of distillation; another row's verdict, "
                     f"picked from {n} rows by its test Dice, would not be.")
    if EXTRA_ROWS & summary.keys():
        lines.append("* not in the paper's Table 4: Teacher_WAug (the teacher the _WAug rows distil from), the class "
                     "teachers and the two other methods, T2KD and DCKD, in our reading; for T2KD the share is of "
                     "Teacher's lead. L_KLD_WAug_Ens3: L_KLD_WAug distilled from the mean logits of Teacher_WAug's "
                     "seeds 0, 1 and 2 (its share is of one Teacher_WAug's lead on the same folds and seeds). L_CWD: "
                     "channel-wise distillation of the logits (Shu et al. 2021).")
    return "\n".join(lines)


# The options that must agree between the study folders of one trend: all but the student's width and
# its epochs (a narrower student may need more to finish learning); the teachers' epochs must agree too.
TREND_SAME = ("data", "classes", "folds", "size", "phantom_count", "data_seed", "val_fraction", "near_dup",
              "teacher_width", "patience", "batch_size", "lr", "schedule", "warmup", "select", "alpha", "T",
              "dckd_level", "teacher_epochs")


def trend(folders):
    """The student-size trend: from each study folder's results.json (one student width each, every
    other option the same), the student alone and the distilled row of highest mean validation Dice
    among those with as many runs, their test Dice with a 95% t interval over the runs, the gain
    (paired by fold and seed) with its interval, the lead over the student alone of the teacher that row
    distils from (on the row's own pairs, with its interval), and the share of that lead the row
    recovers; the rows sorted by the student's parameters."""
    lines = ["| Student width | Params | Epochs | Student alone: runs, Dice [95% CI] | Best distilled row (by val Dice) "
             "| Its runs, Dice [95% CI] | Gain over Student alone [95% CI] | Its teacher's lead [95% CI] "
             "| Share of that lead [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    found = []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise UserError(f"--trend {folder}: no results.json there; run its study (or study.py --table_only with "
                            f"its options) first")
        try:
            with open(path) as f:
                res = json.load(f)
            rows, options = res["rows"], res["options"]
            options = dict(options, teacher_epochs=teachers_epochs(options))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--trend {folder}: its results.json is not a study's; write it again with study.py "
                            f"--table_only and that study's options") from None
        if found:
            differ = [k for k in TREND_SAME if options.get(k) != found[0][0].get(k)]
            if differ:
                raise UserError(f"--trend {folder}: made with other options than {folders[0]}: "
                                + ", ".join(f"--{k} {options.get(k)} (there {found[0][0].get(k)})" for k in differ))
        if options["student_width"] in [o["student_width"] for o, *_ in found]:
            raise UserError(f"--trend {folder}: a second folder of student width {options['student_width']}")
        best = chosen_row(rows)
        if best is None:
            raise UserError(f"--trend {folder}: it needs the student alone and a distilled row with as many runs")
        found.append((options, rows, best))

    def dice(s):  # runs, mean test Dice and its 95% t interval over the runs
        if s["dice_std"] is None:
            return f"{s['runs']}, {100 * s['dice_mean']:.2f}"
        half = kd.t_quantile(0.975, s["runs"] - 1) * s["dice_std"] / math.sqrt(s["runs"])
        return f"{s['runs']}, {100 * s['dice_mean']:.2f} [{100 * (s['dice_mean'] - half):.2f}, {100 * (s['dice_mean'] + half):.2f}]"

    for options, rows, best in sorted(found, key=lambda t: t[1]["Student"]["parameters"]):
        lines.append(f"| {options['student_width']} | {runs.fmt_params(rows['Student']['parameters'])} | "
                     f"{options.get('epochs')} | {dice(rows['Student'])} | {best} | {dice(rows[best])} | "
                     f"{gain_text(rows[best]['gain'])} "
                     f"| {gain_text(rows[best].get('teacher_lead_interval', (None,) * 3))} "
                     f"| {share_text(rows[best].get('share_of_lead'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a stronger teacher?

def ensembles(args, folds, seeds, rows):
    """How much a teacher gains when its seeds vote: per fold, each teacher row's (and the student
    alone's) checkpoints of every seed, and the mean of their logits (models.Ensemble, the teacher a
    student can distil with train_student.py --teacher A.pt,B.pt,C.pt), on the validation and test
    parts; and each seed's model averaged with its mirror image (models.Mirrored, what
    --teacher_flip distils). Trains nothing; needs the checkpoints the study left in --out.
    Returns {row: [per fold]}."""
    device = runs.pick_device(args.device)
    dtype = runs.amp_dtype(device, args.amp)
    found = {}
    for f in folds:
        data = None
        for row in [r for r in rows if "aug" in ROWS[r] and "only_class" not in ROWS[r]] + ["Student"]:
            paths = [os.path.join(run_folder(args, f, s), row + ".pt") for s in seeds]
            if not all(os.path.isfile(p) for p in paths):
                print(f"fold {f} {row}: a checkpoint of seeds {','.join(map(str, seeds))} is missing; skipped")
                continue
            ckpts = [runs.load_checkpoint(p, ("teacher", "student"), "--ensembles") for p in paths]
            if data is None:
                data, splits = runs.load_split_data(argparse.Namespace(**{**vars(args), "fold": f, "split": None}))
                images, masks = data.images.to(device), data.masks.to(device)
            named = {k: [data.names[i] for i in v] for k, v in splits[f].items()}
            if any(c["split"] != named for c in ckpts):
                raise UserError(f"{paths[0]}: trained on another split than fold {f} of --data {args.data}")
            other = sorted({runs.image_size(c) for c in ckpts} - {args.size})
            if other:
                raise UserError(f"{paths[0]}: trained at --size {other[0]}, scored here at {args.size}; give the "
                                f"study's --size")
            models = [runs.to_device(runs.build_model(c), device) for c in ckpts]
            rec = dict(fold=f, seeds=seeds, sha1=[runs.file_hash(p) for p in paths])
            for part in ("val", "test"):
                score = lambda m: kd.evaluate(m, images, masks, splits[f][part], device, dtype)
                each, flipped = [score(m)["dice"] for m in models], [score(Mirrored(m).eval())["dice"] for m in models]
                both = score(Ensemble(models).eval())
                rec[part] = dict(each=each, flipped=flipped, ensemble=both["dice"], names=named[part],
                                 per_image_dice=both["per_image_dice"])
            found.setdefault(row, []).append(rec)
    if not found:
        raise UserError(f"--out {args.out}: no row has checkpoints of every seed {','.join(map(str, seeds))} there; "
                        f"run the study first (the records alone cannot be ensembled)")
    pct = lambda x: f"{100 * x:.2f}"
    lines = ["| Row | Fold | Val Dice %: each seed | mean | mirrored, mean | ensemble | Test Dice %: mean "
             "| mirrored, mean | ensemble |", "|---|---|---|---|---|---|---|---|---|"]
    for row, recs in found.items():
        for r in recs:
            v, t = r["val"], r["test"]
            lines.append(f"| {row} | {r['fold']} | {' / '.join(map(pct, v['each']))} | {pct(np.mean(v['each']))} "
                         f"| {pct(np.mean(v['flipped']))} | {pct(v['ensemble'])} | {pct(np.mean(t['each']))} "
                         f"| {pct(np.mean(t['flipped']))} | {pct(t['ensemble'])} |")
    lines.append(f"\nSeeds {','.join(map(str, seeds))}; mirrored: each seed's model, the mean of its logits on the "
                 f"image and its mirror image; ensemble: the mean of the seeds' logits; thresholded at "
                 f"probability 0.5; {runs.precision_name(dtype)}.")
    print("\n".join(lines))
    name = f"ensembles_fold{'-'.join(map(str, folds))}_seed{'-'.join(map(str, seeds))}.json"  # one probe, one file
    runs.write_json(os.path.join(args.out, name), dict(rows=found, table="\n".join(lines)))
    return found


# ----------------------------------------------------------------------------- pictures

TILE_MIN, PAD, TITLE = 128, 4, 16  # tiles are at least 128 px: a 32 px phantom is too small to see
GREEN, RED = (0, 220, 0), (255, 40, 40)


def outline(mask):
    """Boundary of a binary mask (H, W) as a 2-pixel line: the pixels inside and just outside it."""
    m = np.pad(mask, 1)
    nb = [m[:-2, 1:-1], m[2:, 1:-1], m[1:-1, :-2], m[1:-1, 2:]]  # 4 neighbours
    inner = mask & nb[0] & nb[1] & nb[2] & nb[3]
    outer = ~mask & (nb[0] | nb[1] | nb[2] | nb[3])
    return (mask & ~inner) | outer


def _tile(image, tile, gt=None, pred=None, text=None):
    """One grey image scaled to tile x tile, ground truth outlined green, prediction red, a label."""
    grey = np.asarray(Image.fromarray(image).resize((tile, tile), Image.BILINEAR))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for mask, colour in ((gt, GREEN), (pred, RED)):
        if mask is not None:
            big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tile, tile), Image.NEAREST)) > 127
            rgb[outline(big)] = colour
    im = Image.fromarray(rgb)
    if text:
        draw = ImageDraw.Draw(im)
        draw.rectangle(draw.textbbox((3, 2), text), fill=(0, 0, 0))  # black behind: readable on any grey
        draw.text((3, 2), text, fill=(255, 255, 0))
    return im


def make_pictures(args, fold, seed, best, path):
    """A grid of `args.pictures` test images of `fold`, evenly spaced among its test images: image,
    ground truth, then the Teacher's, the Student alone's and the best distilled student's lesion
    (kd.lesion_mask, preprocessed exactly as in training and testing), Dice on each tile. The best
    distilled row is the one with the best validation Dice: the test part plays no part in choosing it.
    Made from BUSI it shows BUSI's images: keep it out of git (out/ is ignored)."""
    paths = [os.path.join(run_folder(args, fold, seed), r + ".pt") for r in ("Teacher", "Student", best)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # its JSON is there, so the study did not re-run it
        print(f"no pictures: {', '.join(missing)} missing; delete its .json and run the study again to remake it")
        return None
    ckpts = [runs.load_checkpoint(p, "teacher" if i == 0 else "student", "checkpoint") for i, p in enumerate(paths)]
    targs = argparse.Namespace(**ckpts[0]["args"])
    targs.data = args.data
    data, splits = runs.load_split_data(targs)
    split = splits[fold]
    test = split["test"]
    spaced = np.linspace(0, len(test) - 1, min(args.pictures, len(test))).round().astype(int)
    chosen = [test[i] for i in np.unique(spaced)]  # a fixed choice: the same images on every call
    device = runs.pick_device(args.device)
    dtype = runs.amp_dtype(device, args.amp)
    idx = torch.as_tensor(chosen, device=device)
    x, y = kd.batch(data.images.to(device), data.masks.to(device), idx)  # aug none: normalised, channels_last
    preds, dices = [], []
    for ck in ckpts:
        model = runs.to_device(runs.build_model(ck), device)
        with torch.no_grad(), kd.autocast(device, dtype):
            lesion = kd.lesion_mask(model(x))
        preds.append(lesion[:, 0].cpu().numpy())
        dices.append(kd.dice_iou(lesion, y)[0].cpu().numpy())
    titles = ["image", "ground truth (green)", "Teacher (red)", "Student alone", f"{best} (best KD on val)"]
    tile = max(args.size, TILE_MIN)
    grid = Image.new("RGB", (len(titles) * (tile + PAD) + PAD, TITLE + len(chosen) * (tile + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for c, t in enumerate(titles):
        draw.text((PAD + c * (tile + PAD) + 2, 2), t, fill=(0, 0, 0))
    for r, i in enumerate(chosen):
        image, gt = data.images[i, 0].numpy(), data.masks[i, 0].numpy().astype(bool)
        tiles = [_tile(image, tile, text=os.path.basename(data.names[i])), _tile(image, tile, gt=gt)]
        tiles += [_tile(image, tile, gt, p[r], f"Dice {100 * d[r]:.1f}") for p, d in zip(preds, dices)]
        for c, im in enumerate(tiles):
            grid.paste(im, (PAD + c * (tile + PAD), TITLE + PAD + r * (tile + PAD)))
    grid.save(path)
    print(f"saved {path}: {len(chosen)} test images of fold {fold}")
    return path


# ----------------------------------------------------------------------------- the study

def _choose(text, valid, what):
    if text == "all":
        return list(valid)
    chosen = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in chosen if w not in valid]
    if bad or not chosen:
        raise UserError(f"--{what} {text}: {', '.join(bad) or 'empty'} not among {', '.join(map(str, valid))}")
    return chosen


def main(argv=None):
    """Run with command-line words `argv`; returns dict(summary, table, ran), `ran` listing the
    (row, fold, seed) runs this call trained (none when everything was done already); with --trend,
    dict(table), and with --ensembles, dict(ensembles)."""
    p = options()
    args = p.parse_args(argv)
    if args.trend:  # trains nothing: the student-size trend of finished studies
        folders = [f.strip() for f in args.trend.split(",") if f.strip()]
        if not folders:
            raise UserError(f"--trend {args.trend}: give the folders of finished studies, comma-separated")
        table = trend(folders)
        print(table)
        return dict(table=table)
    args = runs.choose_data(p, argv, args, PHANTOM_DEMO)
    runs.check_at_least(args)
    folds = sorted({int(f) for f in _choose(args.fold_list, [str(f) for f in range(args.folds)], "fold_list")})
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        seeds = []
    if not seeds or seeds[0] < 0:
        raise UserError(f"--seeds {args.seeds}: give whole numbers, 0 or more, comma-separated, e.g. 0,1,2")
    chosen = set(_choose(args.rows, list(ROWS), "rows")) | {"Teacher", "Student"}
    for r in [r for r in chosen if not set(ROWS[r].get("ensemble", ())) <= set(seeds)]:
        if args.rows != "all":
            raise UserError(f"--rows {r}: it distils the ensemble of seeds {','.join(map(str, ROWS[r]['ensemble']))} "
                            f"of its teacher; give --seeds with those seeds")
        chosen.discard(r)  # --rows all with fewer seeds: the rows that can run
    chosen |= {t for r in list(chosen) for t in teachers_of(r)}  # a _WAug row needs its teacher, T2KD its two
    wanted = {ROWS[r]["only_class"] for r in chosen if "only_class" in ROWS[r]}  # T2KD's class teachers
    if wanted and not args.table_only:  # said now, not after the first teachers have trained
        labels = load_data(args.data, runs.classes_of(args), args.size, args.phantom_count, args.data_seed).labels
        missing = sorted(wanted - set(labels))
        if missing and args.rows != "all":
            raise UserError(f"--rows: T2KD's class teachers need {' and '.join(missing)} images, and --data "
                            f"{args.data} (--classes {args.classes}) has none; leave out T2KD, T2KD_noWB and the "
                            f"class teachers")
        if missing:
            chosen -= {r for r in chosen if "only_class" in ROWS[r] or "teachers" in ROWS[r]}
            print(f"note: --data {args.data} has no {' or '.join(missing)} images: the study runs without T2KD's rows")
    rows = [r for r in ROWS if r in chosen]  # the paper's order, teachers first
    if args.pictures < 0 or args.n_perm < 1 or args.perm_seed < 0 or args.data_seed < 0:
        raise UserError("--pictures, --perm_seed and --data_seed must be >= 0, and --n_perm >= 1")
    if os.path.isfile(args.out):
        raise UserError(f"--out {args.out}: that is a file; give a folder for the study's runs")
    precision = runs.precision_name(runs.amp_dtype(runs.pick_device(args.device), args.amp))
    seen = set()
    for path in glob.glob(os.path.join(args.out, "fold*", "seed*", "*.json")):
        with open(path) as f:
            seen.add(json.load(f).get("precision"))
    args.precisions_seen = seen or {precision}  # a new run must not mix precisions into a study
    if args.ensembles:
        return dict(ensembles=ensembles(args, folds, seeds, rows))

    records, ran, total = {}, [], len(folds) * len(seeds) * len(rows)
    label = lambda: f"[{len(records) + 1}/{total}]"
    try:
        teachers = [r for r in rows if "aug" in ROWS[r]]
        students = [r for r in rows if r not in teachers]
        for f in folds:
            if args.table_only:  # the records there are, students only with the teachers they were made from
                t_recs = {(t, s): stored(t, f, s, args) for t in teachers for s in seeds}
                for s in seeds:
                    records.update({(t, f, s): t_recs[t, s] for t in teachers if t_recs[t, s]})
                    for r in students:
                        ok = all(t_recs.get(k) for k in teacher_runs(r, s))
                        rec = stored(r, f, s, args, t_recs) if ok else None
                        if rec is not None:
                            records[r, f, s] = rec
                continue
            while True:  # passes, while runs that another study process holds are still to do
                waiting = one_pass(f, seeds, teachers, students, args, precision, records, ran, label)
                if not waiting:
                    break
                r, f_, s = waiting[0]
                print(f"\nwaiting: {holder(r, f_, s, args)} holds fold {f_} seed {s} {r}"
                      + (f" and {len(waiting) - 1} more runs" if len(waiting) > 1 else ""), flush=True)
                wait_for(waiting, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(ran)} runs finished and saved in {args.out}; "
              f"run the same command again to go on", flush=True)
        raise SystemExit(130) from None

    fingerprints = {r["data_fingerprint"] for r in records.values()}
    if len(fingerprints) > 1:
        raise UserError(f"{args.out}: its records were made from {len(fingerprints)} different data sets (or sizes); "
                        f"keep one study folder per data set")
    if not records:
        raise UserError(f"--out {args.out}: no records of these folds, seeds and rows there; run without --table_only")
    groups = image_groups(args, fingerprints.pop())
    summary = summarise(records, rows, args.n_perm, args.perm_seed, groups)
    table = format_table(summary, args, groups is not None)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    chosen_options = {k: v for k, v in vars(args).items() if k != "precisions_seen"}
    runs.write_json(os.path.join(args.out, "results.json"), dict(options=chosen_options, folds=folds, seeds=seeds,
                                                               rows=summary, runs_this_call=ran))
    print(f"\n{table}\n\n{len(ran)} runs trained by this call, {len(records) - len(ran)} reused; "
          f"wrote {os.path.join(args.out, 'table.md')} and results.json")
    best = chosen_row(summary)
    if args.pictures and best:
        make_pictures(args, folds[0], seeds[0], best, os.path.join(args.out, "pictures.png"))
    return dict(summary=summary, table=table, ran=ran)


if __name__ == "__main__":
    runs.exit_on_error(main)
