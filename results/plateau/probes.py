"""Plateau probes: does a recipe finish learning? Fold 0 of BUSI at the study's scale (96 px,
strong augmentation, batch 16, bf16 on a CPU that has it), the teacher (width 32) and the student
alone (width 10; and 4 and 6, smaller), each trained by train_teacher.py (the student alone is a
U-Net trained on the supervised loss: train_student.py --pathway none computes the same), Adam with a cosine
schedule (3 warm-up epochs), no early stopping, for several learning rates and lengths, 3 seeds. Each
run keeps its epoch of lowest validation loss (--select loss: the default when the probes began;
its record holds every epoch's validation loss and Dice, so the table shows both choices).

    python results/plateau/probes.py --data data/Dataset_BUSI_with_GT   # a worker: runs what is left
    python results/plateau/probes.py --table                            # prints table.md from the records
    python results/plateau/probes.py --data data/Dataset_BUSI_with_GT --teachers   # can a teacher know more?
    python results/plateau/probes.py --phantom [--table]                # the same question on the phantom
    python results/plateau/probes.py --sides [--table]                  # the quick start's student side
    python results/plateau/probes.py --data data/Dataset_BUSI_with_GT --dckd   # a worker: DCKD's feature level

Workers share the queue: each claims a run by creating its .claim file in --work (checkpoints and
logs stay there, out of git); a run's record (options, per-epoch validation loss and Dice, times,
machine; no test figures: choices are made on validation) lands in results/plateau/records/ (--dckd: dckd/).
A recipe counts as converged when doubling its epochs moves the mean validation Dice by less than
half a point. Run several workers with OMP_NUM_THREADS=1 to share a CPU's cores. --teachers asks, on
the same validation part, whether a teacher built from the checkpoints of --epochs (60) knows more than
one student alone: each seed, mirrored (models.Mirrored), the 3 seeds' mean logits (models.Ensemble),
and both at once; it writes teachers_fold0.json (teachers_fold0_e<epochs>.json for other lengths). --phantom runs (and tabulates, in phantom.md) U-Nets of
several widths at the quick start's phantom settings for 16 and 40 epochs: is there a teacher that
knows more than the student alone there, within the quick start's few minutes? --sides runs the quick
start itself (train_teacher.py, then train_student.py, phantom defaults) for seeds 0-2 with the student at
96, 48 and 32 px under the 96-px teacher; its records (sides/) hold each run's validation Dice, the
teacher's on the student's grid included (the side is chosen on them), and the test Dice per image.
--dckd runs DCKD (train_student.py --pathway dckd) at each of DCKD_LEVELS: the width-6 student from the
same seed's DCKD_TEACHER probe (its lowest-validation-loss epoch, where the study's teachers keep their
last), the probes' recipe, records in dckd/ and a table in table.md. At the bottleneck (6x6 positions
at 96 px) the lesions of 173 of BUSI's 647 images cover no position (half of one or more) and give no
anchor; at dec3 (24x24) every lesion covers one. The level is chosen on validation.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
SIZE = 96  # the study's side: every student's
QUEUE = [  # (width, epochs, lr[, side]), each for seeds 0, 1, 2, in this order; the side is SIZE unless given
    (10, 60, 1e-3), (32, 60, 1e-3), (10, 120, 1e-3), (10, 60, 3e-3), (10, 60, 3e-4),
    (4, 60, 1e-3), (4, 120, 1e-3), (6, 60, 1e-3), (6, 120, 1e-3),  # smaller students: a larger lead?
    (16, 60, 1e-3, 192),  # a teacher that sees twice the students' side, judged on their grid
    (4, 240, 1e-3),  # has the smallest student stopped improving at 120 epochs?
    (32, 120, 1e-3), (6, 240, 1e-3), (10, 240, 1e-3), (32, 240, 1e-3)]
SEEDS = (0, 1, 2)


DCKD_LEVELS = ("bottleneck", "dec3")  # DCKD's feature level: 6x6 and 24x24 positions at 96 px
DCKD_TEACHER = (32, 120, 1e-3)  # (width, epochs, lr) of the probe whose checkpoint DCKD distils from, seed by seed
PHANTOM_QUEUE = [(24, 16), (10, 16), (4, 16), (16, 40), (10, 40), (6, 40), (24, 40), (4, 40)]  # (width, epochs)


def name(width, epochs, lr, seed, phantom=False, size=SIZE):
    return f"{'phantom_' if phantom else ''}w{width}_e{epochs}_lr{lr:g}{f'_px{size}' * (size != SIZE)}_s{seed}"


def recipe(width, epochs, lr, seed):
    """The probes' recipe at BUSI's scale: batch 16, Adam with a 3-epoch warm-up and cosine decay, no early
    stop, the epoch of lowest validation loss kept, strong augmentation, on the CPU."""
    return ["--width", str(width), "--epochs", str(epochs), "--patience", str(epochs), "--batch_size", "16", "--lr",
            str(lr), "--schedule", "cosine", "--warmup", "3", "--select", "loss", "--seed", str(seed), "--device", "cpu",
            "--aug", "strong"]


def queue(args):
    """(run name, width, epochs, lr, seed, the script's words) of every probe, in order: train_teacher.py's,
    or with --dckd train_student.py's (DCKD at each level, the width-6 student at 120 epochs from the same
    seed's DCKD_TEACHER; seed by seed, so that each level's first runs are paired)."""
    if args.dckd:
        return [(f"dckd_{level}_w6_e120_lr0.001_s{s}", 6, 120, 1e-3, s, [
            "--teacher", os.path.join(args.work, name(*DCKD_TEACHER, s) + ".pt"), "--data", args.data, "--pathway",
            "dckd", "--dckd_level", level] + recipe(6, 120, 1e-3, s) + ["--no-alone"]) for s in SEEDS for level in DCKD_LEVELS]
    if args.phantom:  # the quick start's settings (96 px, 240 images, batch 8), only widths and lengths vary
        return [(name(w, e, 1e-3, s, True), w, e, 1e-3, s, ["--data", "phantom", "--width", str(w), "--epochs", str(e),
                 "--patience", str(e), "--select", "loss", "--seed", str(s), "--device", "cpu"]) for w, e in PHANTOM_QUEUE for s in SEEDS]
    return [(name(w, e, lr, s, size=px), w, e, lr, s, ["--data", args.data, "--size", str(px), "--fold", "0"]
             + recipe(w, e, lr, s)) for w, e, lr, px in [(*q, SIZE)[:4] for q in QUEUE] for s in SEEDS]


def write_record(path, run, width, epochs, lr, seed, argv, ckpt, with_test=False, **more):
    """A run's record: options, per-epoch validation loss and Dice, times, machine; no weights. On the
    phantom (its quick start reports test) and the benchmark's split, also the test Dice per image, with
    the image names; the BUSI probes keep to validation. `more`: added as they are."""
    rec = dict(name=run, width=width, epochs=epochs, lr=lr, seed=seed, fold=0, argv=argv, size=ckpt["args"]["size"],
               parameters=ckpt["parameters"], best_epoch=ckpt["epoch"],
               val=dict(loss=ckpt["val"]["loss"], dice=ckpt["val"]["dice"]), history=ckpt["history"],
               train_seconds=ckpt["test"]["train_seconds"], machine=ckpt["machine"],
               precision=ckpt["precision"], versions=ckpt["versions"])
    if with_test:
        rec["test"] = {k: ckpt["test"][k] for k in ("dice", "per_image_dice", "names")}
    rec.update(more)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)


def train(argv, out, log=None, script="train_teacher.py"):
    """The script with these words, going on with its unfinished state if there is one; its exit code."""
    import runs
    resume = ["--resume"] if os.path.isfile(runs.state_path(out)) else []
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, *resume],
                          stdout=log, stderr=log).returncode


def work(args):
    import torch
    records = os.path.join(HERE, "phantom" if args.phantom else "dckd" if args.dckd else "records")
    os.makedirs(records, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    for run, width, epochs, lr, seed, argv in queue(args):
        record = os.path.join(records, run + ".json")
        teacher = argv[argv.index("--teacher") + 1] if args.dckd else None  # DCKD_TEACHER's probe of this seed
        if teacher and not os.path.isfile(teacher):
            print(f"{run}: needs {teacher}; run the width-{DCKD_TEACHER[0]} {DCKD_TEACHER[1]}-epoch probes first, "
                  "with the same --work", flush=True)
            continue
        try:
            os.close(os.open(os.path.join(args.work, run + ".claim"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if os.path.isfile(record):
            continue
        out = os.path.join(args.work, run + ".pt")
        argv = argv + ["--out", out]
        t0 = time.time()
        with open(os.path.join(args.work, run + ".log"), "a") as log:
            rc = train(argv, out, log, "train_student.py" if args.dckd else "train_teacher.py")
        if rc:
            os.remove(os.path.join(args.work, run + ".claim"))
            print(f"{run}: failed ({rc}), see its log", flush=True)
            continue
        ckpt = torch.load(out, weights_only=True)
        more = {} if args.phantom or ckpt["args"]["size"] == SIZE else dict(on_student_grid=on_student_grid(out, args.data))
        if args.dckd:
            more["dckd_level"] = ckpt["args"]["dckd_level"]
        write_record(record, run, width, epochs, lr, seed, argv, ckpt, args.phantom, **more)
        print(f"{run}: done in {time.time() - t0:.0f} s", flush=True)


def on_student_grid(path, data_path):
    """Validation Dice of a teacher trained at a larger side on the students' SIZE-px grid, plain and
    mirrored (models.Mirrored)."""
    import runs
    from data import load_data
    ckpt = runs.load_checkpoint(path, "teacher")
    big, small = (load_data(data_path, size=px) for px in (ckpt["args"]["size"], SIZE))
    val = [big.names.index(n) for n in ckpt["split"]["val"]]
    dice = lambda mirrored: pooled_dice(ckpt, big, small, val, mirrored)["dice"]
    return dict(size=SIZE, val_dice=dice(False), val_dice_mirrored=dice(True))


def pooled_dice(ckpt, big, small, indices, mirrored=False):
    """kd.evaluate of a teacher that sees `big` (its own side): its logits averaged over blocks onto
    `small`'s grid (models.Pooled, as train_student.py --student_size distils it), against the masks
    as a student at that side sees them."""
    import torch
    import kd
    import runs
    from models import Mirrored, Pooled
    teacher = Pooled(runs.build_model(ckpt), big.images.shape[-1] // small.images.shape[-1])
    device = torch.device("cpu")
    return kd.evaluate(Mirrored(teacher) if mirrored else teacher, big.images, small.masks, indices, device,
                       runs.amp_dtype(device))


def last_tenth(r):
    """A run's mean validation Dice over the last tenth of its epochs."""
    h = r["history"][-max(1, r["epochs"] // 10):]
    return sum(x["val_dice"] for x in h) / len(h)


def table():
    recs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "records", "*.json")))]
    groups = {}
    for r in recs:
        if r.get("size", SIZE) == SIZE:
            groups.setdefault((r["width"], r["lr"], r["epochs"]), []).append(r)
    mean = lambda xs: sum(xs) / len(xs)
    lines = ["| width | lr | epochs | seeds | val Dice at the lowest val loss (--select loss) | val Dice, last epoch "
             "(--select last) | val Dice, mean of last tenth | lowest val loss in last tenth | change of the last tenth on "
             "doubling the epochs (the seeds run at both lengths) |", "|---|---|---|---|---|---|---|---|---|"]
    lowest = lambda r: min(r["history"], key=lambda h: h["val_loss"])
    for (w, lr, e), rs in sorted(groups.items()):
        last = mean([last_tenth(r) for r in rs])
        late = sum(lowest(r)["epoch"] > e - e // 10 for r in rs)
        longer = {r["seed"]: r for r in groups.get((w, lr, 2 * e), [])}
        steps = [last_tenth(longer[r["seed"]]) - last_tenth(r) for r in rs if r["seed"] in longer]  # the same seeds only
        change = (f"{100 * mean(steps):+.2f} (up in {sum(d > 0 for d in steps)}, down in {sum(d < 0 for d in steps)} "
                  f"of {len(steps)} seeds)" if steps else "")
        lines.append(f"| {w} | {lr:g} | {e} | {len(rs)} | {100 * mean([lowest(r)['val_dice'] for r in rs]):.2f} | "
                     f"{100 * mean([r['history'][-1]['val_dice'] for r in rs]):.2f} | {100 * last:.2f} | "
                     f"{late} of {len(rs)} | {change} |")
    lines += ["", "Mean validation Dice over seeds, every 10th epoch (the curves):", "",
              "| width | lr | epochs | " + " | ".join(f"ep {k}" for k in range(10, 241, 10)) + " |",
              "|---|---|---|" + "---|" * 24]
    for (w, lr, e), rs in sorted(groups.items()):
        n = min(len(r["history"]) for r in rs)
        cells = [f"{100 * mean([r['history'][k - 1]['val_dice'] for r in rs]):.1f}" if k <= n else "" for k in range(10, 241, 10)]
        lines.append(f"| {w} | {lr:g} | {e} | " + " | ".join(cells) + " |")
    gap = [100 * (r["history"][-1]["val_dice"] - lowest(r)["val_dice"]) for r in recs]
    lines += ["", f"Last epoch against the lowest-validation-loss epoch, validation Dice: {mean(gap):+.2f} on average over "
              f"the {len(recs)} runs in records/ (those above and the larger-side teachers below), higher in "
              f"{sum(g > 0 for g in gap)}, lower in {sum(g < 0 for g in gap)}, equal in {sum(g == 0 for g in gap)} (the "
              "lowest-loss epoch is itself chosen on this validation part, so the comparison favours it)."]
    machines = sorted({r["machine"] for r in recs})
    lines += ["", f"Records: {len(recs)} runs (records/), fold 0 of the near-copy-aware split (--near_dup 0.95), validation "
              f"part only; machines: {'; '.join(machines)}."]
    lines += larger_teachers(recs, groups) + built_teachers(groups) + dckd_levels(groups)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(text)
    print(text)


def larger_teachers(recs, groups):
    """Table lines: the teachers that saw a larger side, on the students' grid, and their lead over the
    students alone of widths 10 and 6 at 120 epochs, seed by seed (kept epochs: lowest validation loss)."""
    big = {}
    for r in recs:
        if r.get("size", SIZE) != SIZE:
            big.setdefault((r["width"], r["size"], r["epochs"]), {})[r["seed"]] = r
    if not big:
        return []
    seeds = lambda d: " / ".join(f"{100 * v:.2f}" for v in d)
    lines = ["", f"Teachers that see a larger side, validation Dice on the students' {SIZE}-px grid (models.Pooled), "
             "seeds in order; the lead is over the same seed's student alone (120 epochs, lowest-validation-loss epoch):", "",
             "| teacher | side | epochs | seeds | Dice | mirrored | lead over width 10 | lead over width 6 |",
             "|---|---|---|---|---|---|---|---|"]
    for (w, px, e), rs in sorted(big.items()):
        own = [rs[s]["on_student_grid"]["val_dice"] for s in sorted(rs)]
        flip = [rs[s]["on_student_grid"]["val_dice_mirrored"] for s in sorted(rs)]
        leads = []
        for width in (10, 6):
            alone = {r["seed"]: r["val"]["dice"] for r in groups.get((width, 1e-3, 120), [])}
            d = [rs[s]["on_student_grid"]["val_dice"] - alone[s] for s in sorted(rs) if s in alone]
            leads.append(" / ".join(f"{100 * v:+.2f}" for v in d) + f" (mean {100 * sum(d) / len(d):+.2f})" if d else "")
        lines.append(f"| width {w} | {px} px | {e} | {', '.join(map(str, sorted(rs)))} | {seeds(own)} | {seeds(flip)} | "
                     f"{leads[0]} | {leads[1]} |")
    return lines


def built_teachers(groups):
    """Table lines: the teachers of `--teachers` (teachers_fold0*.json): each seed, mirrored, the three
    seeds' mean logits, and both; then the lead of each over the students alone (kept epochs: lowest
    validation loss, mean over seeds) of widths 10 and 6 at 120 epochs and width 4 at 240."""
    files = sorted(glob.glob(os.path.join(HERE, "teachers_fold0*.json")))
    if not files:
        return []
    students = [groups[w, 1e-3, e] for w, e in [(10, 120), (6, 120), (4, 240)] if (w, 1e-3, e) in groups]
    alone = {(rs[0]["width"], rs[0]["epochs"]): sum(r["val"]["dice"] for r in rs) / len(rs) for rs in students}
    lines = ["", "Teachers built from trained ones without training (`--teachers`), validation Dice; the lead is over "
             "the students alone (kept epochs, mean over seeds): " + ", ".join(f"width {w} at {e} epochs {100 * v:.2f}"
                                                                         for (w, e), v in alone.items()) + ":", "",
             "| teacher | epochs | view | Dice | " + " | ".join(f"lead over width {w}" for w, _ in alone) + " |",
             "|---|---|---|---|" + "---|" * len(alone)]
    for path in files:
        t = json.load(open(path))
        for key in [k for k in t if k.startswith("width")]:
            for view, dice in (("each seed", t[key]["each"]), ("each seed, mirrored", t[key]["mirrored"]),
                               ("3 seeds' mean logits", [t[key]["ensemble"]]),
                               ("3 seeds' mean logits, mirrored", [t[key]["mirrored_ensemble"]])):
                avg = sum(dice) / len(dice)
                lines.append(f"| {key} | {t.get('epochs', 60)} | {view} | {' / '.join(f'{d:.2f}' for d in dice)} | "
                             + " | ".join(f"{avg - 100 * v:+.2f}" for v in alone.values()) + " |")
    return lines


def dckd_levels(groups):
    """Table lines: DCKD at each feature level (probes.py --dckd), validation Dice seed by seed, and its
    gain over the same seed's width-6 student alone (same recipe, same initial weights and batches)."""
    recs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "dckd", "*.json")))]
    if not recs:
        return []
    alone = {r["seed"]: r for r in groups.get((6, 1e-3, 120), [])}
    plain = lambda xs: " / ".join(f"{100 * x:.2f}" for x in xs)
    signed = lambda xs: " / ".join(f"{100 * x:+.2f}" for x in xs) + f" (mean {100 * sum(xs) / len(xs):+.2f})" if xs else ""
    teachers = sorted({os.path.basename(r["argv"][r["argv"].index("--teacher") + 1]) for r in recs})
    lines = ["", f"DCKD's feature level (`--dckd`): the width-6 student distilled from the same seed's teacher probe "
             f"({', '.join(teachers)}), validation Dice by seed; the gain is over the same seed's width-6 student "
             "alone at 120 epochs:", "",
             "| level | seeds | Dice at the lowest val loss | its gain | Dice, mean of last tenth | its gain |",
             "|---|---|---|---|---|---|"]
    for level in DCKD_LEVELS:
        rs = sorted((r for r in recs if r["dckd_level"] == level), key=lambda r: r["seed"])
        if not rs:
            continue
        paired = [r for r in rs if r["seed"] in alone]
        gain = lambda score: signed([score(r) - score(alone[r["seed"]]) for r in paired])
        lines.append(f"| {level} | {', '.join(str(r['seed']) for r in rs)} | {plain([r['val']['dice'] for r in rs])} | "
                     f"{gain(lambda r: r['val']['dice'])} | {plain([last_tenth(r) for r in rs])} | {gain(last_tenth)} |")
    return lines


def phantom_table():
    """The phantom probes: does a wider U-Net know more than a narrower one at the quick start's
    scale? Per width and length, each seed's validation and test Dice; then each teacher candidate's
    lead over each student, seed by seed (the same seed: the same data stream)."""
    recs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "phantom", "*.json")))]
    runs = {(r["width"], r["epochs"], r["seed"]): r for r in recs}
    cell = lambda xs: " / ".join(f"{100 * x:.1f}" for x in xs) + f" (mean {100 * sum(xs) / len(xs):.1f})"
    lines = ["| width | parameters | epochs | val Dice, seeds 0 / 1 / 2 | test Dice, seeds 0 / 1 / 2 | best epoch in last tenth |",
             "|---|---|---|---|---|---|"]
    groups = sorted({(w, e) for w, e, _ in runs})
    for w, e in groups:
        rs = [runs[w, e, s] for s in SEEDS if (w, e, s) in runs]
        lines.append(f"| {w} | {rs[0]['parameters'] / 1e6:.2f}M | {e} | {cell([r['val']['dice'] for r in rs])} | "
                     f"{cell([r['test']['dice'] for r in rs])} | {sum(r['best_epoch'] > e - e // 10 for r in rs)} of {len(rs)} |")
    lines += ["", "The lead of a wider U-Net (teacher) over a narrower one (student alone), validation Dice, seeds 0 / 1 / 2:", "",
              "| epochs | teacher width | student width | lead on validation | lead on test |", "|---|---|---|---|---|"]
    for e in sorted({e for _, e in groups}):
        widths = sorted({w for w, e2 in groups if e2 == e}, reverse=True)
        for t in widths:
            for st in widths:
                pairs = [(runs[t, e, s], runs[st, e, s]) for s in SEEDS if (t, e, s) in runs and (st, e, s) in runs]
                if t > st and len(pairs) == len(SEEDS):
                    lead = lambda part: cell([a[part]["dice"] - b[part]["dice"] for a, b in pairs])
                    lines.append(f"| {e} | {t} | {st} | {lead('val')} | {lead('test')} |")
    machines = sorted({r["machine"] for r in recs})
    lines += ["", f"Records: {len(recs)} runs, the phantom (240 images, 96 px, fold 0 of 3: 136 train, 24 validation, "
              f"80 test), batch 8, Adam 1e-3 with a 3-epoch warm-up and cosine decay; one CPU thread per run; machines: "
              f"{'; '.join(machines)}. A Dice of 0.0 is a run that never left the all-background answer."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "phantom.md"), "w") as f:
        f.write(text)
    print(text)


SIDES = (96, 48, 32)  # the quick start's student sides under its 96-px teacher


def sides(args):
    """The quick start at each student side, seeds 0-2: teacher (train_teacher.py's phantom defaults),
    then train_student.py (student alone and distilled from the logits), one record per side and seed."""
    import runs
    import train_student
    records = os.path.join(HERE, "sides")
    os.makedirs(records, exist_ok=True)
    keep = lambda r: dict(dice=r["dice"], per_image_dice=r["per_image_dice"])
    for seed in SEEDS:
        teacher = os.path.join(args.work, "sides", f"teacher_s{seed}.pt")
        if not os.path.isfile(teacher) and train(["--data", "phantom", "--seed", str(seed), "--out", teacher], teacher):
            sys.exit(f"the teacher of seed {seed} failed, see its log")
        for side in SIDES:
            record = os.path.join(records, f"side{side}_s{seed}.json")
            if os.path.isfile(record):
                continue
            out = os.path.join(args.work, "sides", f"side{side}_s{seed}", "distilled.pt")
            words = ["--teacher", teacher, "--student_size", str(side), "--seed", str(seed), "--out", out]
            distilled = train_student.main(words)
            alone = runs.load_checkpoint(os.path.join(os.path.dirname(out), "student_alone.pt"), "student")
            p = train_student.options()  # the teacher's data and split, and the student's side, as main saw them
            a, ckpts, data, split = train_student.load_teachers(p, words, p.parse_args(words))
            small, _ = train_student.student_data(a, data)
            names = runs.names_per_part(split, data)
            rec = dict(side=side, seed=seed, teacher_side=a.size, argv=words, names=dict(val=names["val"], test=names["test"]),
                       teacher=dict(val=keep(pooled_dice(ckpts[0], data, small, split["val"])), test=keep(distilled["teacher_test"])),
                       alone=dict(val=keep(alone["val"]), test=keep(alone["test"]), train_seconds=alone["test"]["train_seconds"]),
                       distilled=dict(val=keep(distilled["val"]), test=keep(distilled["test"]),
                                      train_seconds=distilled["test"]["train_seconds"]),
                       machine=distilled["machine"], precision=distilled["precision"], versions=distilled["versions"])
            with open(record, "w") as f:
                json.dump(rec, f, indent=1)


def sides_table():
    """Per student side: the teacher's lead over the student alone and distillation's gain, seed by
    seed, on validation (where the side is chosen) and on test, with paired intervals over the test images."""
    import kd
    recs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "sides", "*.json")))]
    diff = lambda r, a, b, part: [100 * (x - y) for x, y in zip(r[a][part]["per_image_dice"], r[b][part]["per_image_dice"])]
    mean = lambda xs: sum(xs) / len(xs)
    lines = ["| student side | seed | val: teacher / alone / distilled | val lead | test: teacher / alone / distilled | "
             "test lead [95%] | test gain [95%] |", "|---|---|---|---|---|---|---|"]
    for side in SIDES:
        rs = sorted((r for r in recs if r["side"] == side), key=lambda r: r["seed"])
        for r in rs:
            three = lambda part: " / ".join(f"{100 * r[k][part]['dice']:.2f}" for k in ("teacher", "alone", "distilled"))
            ci = lambda d: "{:+.2f} [{:+.2f}, {:+.2f}]".format(*kd.paired_interval(d))
            lines.append(f"| {side} | {r['seed']} | {three('val')} | {mean(diff(r, 'teacher', 'alone', 'val')):+.2f} | "
                         f"{three('test')} | {ci(diff(r, 'teacher', 'alone', 'test'))} | {ci(diff(r, 'distilled', 'alone', 'test'))} |")
        if rs:
            lines.append(f"| {side} | mean | | {mean([mean(diff(r, 'teacher', 'alone', 'val')) for r in rs]):+.2f} | | "
                         f"{mean([mean(diff(r, 'teacher', 'alone', 'test')) for r in rs]):+.2f} | "
                         f"{mean([mean(diff(r, 'distilled', 'alone', 'test')) for r in rs]):+.2f} |")
    machines = sorted({r["machine"] for r in recs})
    lines += ["", f"Records: {len(recs)} quick starts (phantom, 240 images, teacher width 24 at 96 px, fold 0 of 3: 24 "
              f"validation and 80 test images; Dice on the student's grid); machines: {'; '.join(machines)}. The "
              "intervals are paired over the test images, conditional on the trained models and the split."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "sides.md"), "w") as f:
        f.write(text)
    print(text)


def teachers(args):
    """Each seed's checkpoint, mirrored, the seeds' mean logits, and both, on fold 0's validation
    part (BUSI: every width whose three seeds' checkpoints of --epochs are in --work) or, with
    --phantom, its validation and test parts (the 40-epoch widths 24, 16, 10 and 6); the numbers go
    to teachers_fold0.json (60 epochs), teachers_fold0_e<epochs>.json or teachers_phantom.json."""
    import torch
    import kd
    import runs
    import train_teacher
    from models import Ensemble, Mirrored
    epochs = 40 if args.phantom else args.epochs
    path = lambda w, s: os.path.join(args.work, name(w, epochs, 1e-3, s, args.phantom) + ".pt")
    widths = (24, 16, 10, 6) if args.phantom else [w for w in (32, 16, 10, 6, 4)
                                                   if all(os.path.isfile(path(w, s)) for s in SEEDS)]
    if not widths:
        sys.exit(f"--teachers: no width has the checkpoints of seeds 0-2 at {epochs} epochs in {args.work}")
    ckpts = {(w, s): runs.load_checkpoint(path(w, s), "teacher") for w in widths for s in SEEDS}
    data_argv = ["--data", "phantom", "--size", "96"] if args.phantom else ["--data", args.data, "--size", "96"]
    data, splits = runs.load_split_data(train_teacher.options().parse_args(data_argv))
    device = torch.device("cpu")
    dtype = runs.amp_dtype(device)
    out = {}
    for part in ("val", "test") if args.phantom else ("val",):
        dice = lambda m: 100 * kd.evaluate(m.eval(), data.images, data.masks, splits[0][part], device, dtype)["dice"]
        for w in widths:
            models = [runs.build_model(ckpts[w, s]) for s in SEEDS]
            out[f"width {w}" + (f", {part}" if args.phantom else "")] = dict(
                each=[dice(m) for m in models], mirrored=[dice(Mirrored(m)) for m in models],
                ensemble=dice(Ensemble(models)), mirrored_ensemble=dice(Mirrored(Ensemble(models))))
    out.update(data=data_argv[1], fold=0, images={part: len(splits[0][part]) for part in ("val", "test")},
               epochs=epochs, machine=runs.machine_name(device), precision=runs.precision_name(dtype))
    file = "teachers_phantom.json" if args.phantom else "teachers_fold0.json" if epochs == 60 else f"teachers_fold0_e{epochs}.json"
    with open(os.path.join(HERE, file), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join("data", "Dataset_BUSI_with_GT"), help="the BUSI folder")
    p.add_argument("--work", default=os.path.join("out", "plateau"), help="checkpoints, logs and claims")
    p.add_argument("--table", action="store_true", help="print (and write table.md) from the records")
    p.add_argument("--teachers", action="store_true", help="test teacher candidates on fold 0's validation part")
    p.add_argument("--epochs", type=int, default=60, help="--teachers on BUSI: the checkpoints of this many epochs")
    p.add_argument("--phantom", action="store_true", help="the phantom probes (records in phantom/) instead of BUSI's")
    p.add_argument("--dckd", action="store_true", help="DCKD at each feature level from DCKD_TEACHER's probes (dckd/)")
    p.add_argument("--sides", action="store_true", help="the quick start with its student at 96, 48 and 32 px (sides/)")
    a = p.parse_args()
    if a.sides:
        sides_table() if a.table else sides(a)
    elif a.table:
        phantom_table() if a.phantom else table()
    else:
        teachers(a) if a.teachers else work(a)
