"""Reproduce the main paper's Table 4: every distillation pathway x loss x teacher augmentation,
over the folds of the k-fold split, with paired permutation p-values. One command:

    python study.py                               # BUSI at data/Dataset_BUSI_with_GT, else the phantom
    python study.py --fold_list 0 --rows Teacher,Student,L_KLD_WAug --epochs 20
    python study.py --epochs 500 --patience 50 --batch_size 64 --teacher_width 112   # the paper's scale

Per fold it trains two teachers (train_teacher.py --aug strong and --aug weak), then the student
alone and twelve distilled students (train_student.py), each row from the teacher its name says:
_WAug rows from the weak one. Every finished run leaves its checkpoint and one small JSON in the
study folder (out/study/fold0/L_KLD.json, .pt); a run whose JSON is there is not run again, so a
killed study goes on where it stopped: run the same command again. At the end it writes
table.md (printed too), results.json and pictures.png into the study folder.
"""
import argparse
import json
import os
import shlex

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import UserError
import kd
import train_student
import train_teacher

OPTIONS = [  # (name, default, help[, choices]): every default in one place
    ("data", kd.DEFAULT_DATA, "BUSI folder, a folder with images/ and masks/, or 'phantom'"),
    ("classes", "benign,malignant", "BUSI classes to use, comma-separated"),
    ("folds", 3, "k of the k-fold split (the paper: 3-fold cross-validation)"),
    ("fold_list", "all", "which folds to run, e.g. 0,2 (default: all of them)"),
    ("rows", "all", "which rows to run, e.g. Student,L_KLD,L_KLD_WAug; Teacher and Student always run "
                    "(the p-values compare against them)"),
    ("size", 224, "images are resized to size x size (the paper: 224)"),
    ("phantom_count", 240, "number of phantom images"),
    ("data_seed", 0, "seed of the split (and of the phantom)"),
    ("val_fraction", 0.15, "share of the training part held out for early stopping"),
    ("teacher_width", 64, "teacher U-Net width: 64 = 31.0M params, 112 = 95.0M (the paper's scale)"),
    ("student_width", 10, "student U-Net width: 10 = 0.76M params (the paper: 0.82M)"),
    ("epochs", 100, "most epochs of every run (the paper: 500)"),
    ("patience", 20, "early stopping patience of every run (the paper: 50)"),
    ("batch_size", 16, "images per step (the paper: 64)"),
    ("lr", 1e-4, "Adam learning rate (the paper: 1e-4)"),
    ("alpha", 0.5, "weight of L_distill in Eq. I (the paper: 0.5)"),
    ("T", 1.0, "KLD temperature (the paper gives none: 1)"),
    ("seed", 0, "seed of every run: rows differ only in what they distil, which the paired test needs"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "mixed precision: auto, bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("compile", False, "torch.compile the training forward passes"),
    ("n_perm", 10000, "random sign flips of the permutation test when there are more than 20 pairs"),
    ("perm_seed", 0, "seed of those sign flips"),
    ("pictures", 4, "test images of the first fold shown in pictures.png (0: no picture)"),
    ("out", "out/study", "the study folder: runs, checkpoints, table.md, results.json, pictures.png"),
]
# When no BUSI is present: a small study, 45 runs in about 8 minutes on 2 CPU cores.
PHANTOM_DEMO = dict(size=64, phantom_count=120, epochs=20, batch_size=8, teacher_width=16, student_width=8)

# ----------------------------------------------------------------------------- the rows of Table 4

PATHWAYS = {"L": "logits", "H": "hidden", "HReg": "hidden_regressor"}  # the paper's names -> ours
ROWS = {"Teacher": dict(aug="strong"), "Teacher_WAug": dict(aug="weak"),
        "Student": dict(teacher="Teacher", pathway="none")}
for _p, _pathway in PATHWAYS.items():
    for _loss in ("MSE", "KLD"):
        for _waug in ("", "_WAug"):  # the paper's order: L_MSE, L_MSE_WAug, L_KLD, ...
            ROWS[f"{_p}_{_loss}{_waug}"] = dict(teacher="Teacher" + _waug, pathway=_pathway, loss=_loss.lower())
EXTRA_ROWS = {"Teacher_WAug"}  # not in the paper's table: the teacher the _WAug rows distil from
DISTILLED = [r for r in ROWS if "pathway" in ROWS[r] and ROWS[r]["pathway"] != "none"]
PAPER = {  # Table 4 of Behboodi et al. 2025, Dice %, mean (+- std) over 3 folds of UDIAT
    "Teacher": "81.50 ± 18.40", "Student": "73.16 ± 23.78", "L_MSE": "77.75", "L_MSE_WAug": "77.52",
    "L_KLD": "78.00", "L_KLD_WAug": "80.00 ± 18.86", "H_MSE": "77.50", "H_MSE_WAug": "77.85", "H_KLD": "79.00",
    "H_KLD_WAug": "78.50", "HReg_MSE": "78.06", "HReg_MSE_WAug": "77.63", "HReg_KLD": "79.00",
    "HReg_KLD_WAug": "79.31",
}
HOW_NOT_WHAT = {"device", "amp", "compile", "out", "teacher"}  # options that may change on resuming


def run_argv(row, fold, args):
    """The exact command-line words of one run: everything explicit, so no script default (nor the
    scripts' phantom quick-demo settings) decides anything behind the study's back."""
    spec, folder = ROWS[row], os.path.join(args.out, f"fold{fold}")
    common = ["--epochs", args.epochs, "--patience", args.patience, "--batch_size", args.batch_size,
              "--lr", args.lr, "--seed", args.seed, "--device", args.device, "--amp", args.amp]
    if "aug" in spec:  # a teacher
        argv = ["--data", args.data, "--classes", args.classes, "--size", args.size, "--folds", args.folds,
                "--fold", fold, "--val_fraction", args.val_fraction, "--data_seed", args.data_seed,
                "--phantom_count", args.phantom_count, "--width", args.teacher_width, "--aug", spec["aug"]] + common
    else:  # a student: data and split come from its teacher's checkpoint
        argv = ["--teacher", os.path.join(folder, spec["teacher"] + ".pt"), "--data", args.data,
                "--pathway", spec["pathway"]] + (["--loss", spec["loss"]] if "loss" in spec else []) + [
                "--alpha", args.alpha, "--T", args.T, "--width", args.student_width, "--aug", "strong"] + common
    argv += ["--out", os.path.join(folder, row + ".pt")] + (["--compile"] if args.compile else [])
    return [str(w) for w in argv]


def _what(argv):
    """The options of an argv that decide its result (not where or how fast it runs)."""
    pairs, key = {}, None
    for w in argv:
        if w.startswith("--"):
            key = w[2:]
            pairs[key] = True
        elif key is not None:
            pairs[key] = w
    return {k: v for k, v in pairs.items() if k not in HOW_NOT_WHAT}


def _write_json(path, obj):
    tmp = path + ".tmp"  # atomic, like kd.save_checkpoint: a killed study never leaves half a file
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_one(row, fold, args, label):
    """Run one row on one fold unless its JSON says it is done; returns (record, ran)."""
    argv = run_argv(row, fold, args)
    json_path, ckpt_path = (os.path.join(args.out, f"fold{fold}", row + ext) for ext in (".json", ".pt"))
    teacher = "aug" in ROWS[row]
    if os.path.isfile(json_path):
        with open(json_path) as f:
            rec = json.load(f)
        if _what(rec["argv"]) != _what(argv):
            old, new = _what(rec["argv"]), _what(argv)
            diff = ", ".join(f"--{k} {old.get(k)} (now {new.get(k)})" for k in sorted(old.keys() | new.keys())
                             if old.get(k) != new.get(k))
            raise UserError(f"{json_path}: made with other options: {diff}; give another --out, "
                            f"or delete the file to run it again")
        if not teacher or os.path.isfile(ckpt_path):  # a teacher's students need its checkpoint too
            return rec, False
    script = train_teacher if teacher else train_student
    print(f"\n=== {label} fold {fold} {row}: python {script.__name__}.py {shlex.join(argv)}", flush=True)
    try:
        ckpt = script.main(argv)
    except FloatingPointError as e:
        raise FloatingPointError(f"fold {fold} {row}: {e}") from None
    if ckpt["stopped"] == "interrupted":  # the script went on with its best checkpoint after Ctrl-C;
        raise KeyboardInterrupt            # the study must not record such a cut-short run as finished
    t = ckpt["test"]
    rec = dict(row=row, fold=fold, dice=t["dice"], dice_std=t["dice_std"], iou=t["iou"], iou_std=t["iou_std"],
               per_image_dice=t["per_image_dice"], per_image_iou=t["per_image_iou"], names=t["names"],
               parameters=ckpt["parameters"], train_seconds=t["train_seconds"], epoch=ckpt["epoch"],
               script=script.__name__ + ".py", argv=argv, checkpoint=ckpt_path)
    _write_json(json_path, rec)
    return rec, True


# ----------------------------------------------------------------------------- the paired test

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
    if len(d) <= 20:
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

def summarise(records, rows, folds, n_perm, seed):
    """records: {(row, fold): record} -> one dict per row, and the teacher - student gap per fold."""
    def per_image(row):  # image name -> Dice, pooled over the folds this row has
        return {n: d for f in folds if (row, f) in records
                for n, d in zip(records[row, f]["names"], records[row, f]["per_image_dice"])}

    out = {}
    for row in rows:
        recs = [records[row, f] for f in folds if (row, f) in records]
        if not recs:
            continue
        fold_dice = [r["dice"] for r in recs]
        images = np.array(list(per_image(row).values()))
        s = dict(folds=[r["fold"] for r in recs], dice_folds=fold_dice, dice_mean=float(np.mean(fold_dice)),
                 dice_std=float(np.std(fold_dice, ddof=1)) if len(recs) > 1 else None,
                 image_dice_mean=float(images.mean()), image_dice_std=float(images.std()), n_images=len(images),
                 iou_mean=float(np.mean([r["iou"] for r in recs])), parameters=recs[0]["parameters"],
                 train_seconds=float(sum(r["train_seconds"] for r in recs)), paper=PAPER.get(row))
        for base in ("Teacher", "Student"):
            if row == base or not any((base, f) in records for f in folds):
                s[f"p_vs_{base.lower()}"], s[f"pairs_vs_{base.lower()}"] = None, 0
                continue
            mine, theirs = per_image(row), per_image(base)
            names = sorted(mine.keys() & theirs.keys())  # images matched by name
            s[f"p_vs_{base.lower()}"] = paired_permutation_test([mine[n] for n in names], [theirs[n] for n in names],
                                                                n_perm, seed)
            s[f"pairs_vs_{base.lower()}"] = len(names)
        out[row] = s
    gap = {f: records["Teacher", f]["dice"] - records["Student", f]["dice"] for f in folds
           if ("Teacher", f) in records and ("Student", f) in records}
    return out, gap


def _p(p):
    return "—" if p is None else f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def format_table(summary, gap, args, folds):
    pct = lambda x: f"{100 * x:.2f}"
    lines = ["| Row | Dice % (folds) | Dice % (images) | IoU % | Params | Train time | p vs Teacher | p vs Student "
             "| Paper Dice % |", "|---|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        name = f"{row}*" if row in EXTRA_ROWS else row
        fold_dice = pct(s["dice_mean"]) + ("" if s["dice_std"] is None else f" ± {pct(s['dice_std'])}")
        lines.append(f"| {name} | {fold_dice} | {pct(s['image_dice_mean'])} ± {pct(s['image_dice_std'])} "
                     f"| {pct(s['iou_mean'])} | {kd.fmt_params(s['parameters'])} | {kd.fmt_time(s['train_seconds'])} "
                     f"| {_p(s['p_vs_teacher'])} | {_p(s['p_vs_student'])} | {s['paper'] or '—'} |")
    n = max((s["n_images"] for s in summary.values()), default=0)
    pairs = sorted({s[k] for s in summary.values() for k in ("pairs_vs_teacher", "pairs_vs_student") if s[k]})
    tests = len({frozenset((row, base)) for row, s in summary.items() for base in ("Teacher", "Student")
                 if s[f"p_vs_{base.lower()}"] is not None})  # Teacher vs Student counts once
    test = (f"n = {', '.join(map(str, pairs))} pairs; exact over all 2^n sign patterns when n <= 20, else "
            f"{args.n_perm} random sign flips with seed {args.perm_seed}, p = (count + 1) / (n_perm + 1)")
    lines += [
        "",
        f"Data: {args.data}, folds {','.join(map(str, folds))} of {args.folds}, {args.size}x{args.size}, "
        f"teacher width {args.teacher_width}, student width {args.student_width}, at most {args.epochs} epochs "
        f"(patience {args.patience}). Dice % (folds): mean ± sample std of the per-fold mean Dice; "
        f"Dice % (images): mean ± std over all {n} test images pooled over the folds (the paper's ± looks like "
        f"this per-image spread); IoU: mean of the per-fold means; train time: summed over the folds.",
        f"p: two-sided paired sign-flip permutation test on per-image Dice, images matched by name ({test}); "
        f"{tests} tests, not corrected for multiple comparisons: at 0.05, about one in twenty "
        f"is 'significant' by chance.",
    ]
    if EXTRA_ROWS & summary.keys():
        lines.append("* extra row, not in the paper's Table 4: the weak-augmentation teacher "
                     "the _WAug rows distil from.")
    if gap:
        lines.append("Teacher - Student alone, Dice points per fold: "
                     + ", ".join(f"fold {f} {100 * g:+.2f}" for f, g in gap.items())
                     + " (the paper: 81.50 - 73.16 = +8.34 on average).")
    return "\n".join(lines)


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


def make_pictures(args, fold, best, path):
    """A grid of `args.pictures` test images of `fold`, evenly spaced among its test images: image,
    ground truth, then the Teacher's, the Student alone's and the best distilled student's lesion
    (softmax[:, 1] >= 0.5, preprocessed exactly as in training and testing), Dice on each tile.
    Made from BUSI it shows BUSI's images: keep it out of git (out/ is ignored)."""
    paths = [os.path.join(args.out, f"fold{fold}", r + ".pt") for r in ("Teacher", "Student", best)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # its JSON is there, so the study did not re-run it
        print(f"no pictures: {', '.join(missing)} missing; delete its .json and run the study again to remake it")
        return None
    ckpts = [kd.load_checkpoint(p, "teacher" if i == 0 else "student", "checkpoint") for i, p in enumerate(paths)]
    targs = argparse.Namespace(**ckpts[0]["args"])
    targs.data = args.data
    data, split = kd.load_split_data(targs)
    test = split["test"]
    spaced = np.linspace(0, len(test) - 1, min(args.pictures, len(test))).round().astype(int)
    chosen = [test[i] for i in np.unique(spaced)]  # a fixed choice: the same images on every call
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    idx = torch.as_tensor(chosen, device=device)
    x, y = kd.batch(data.images.to(device), data.masks.to(device), idx)  # aug none: normalised, channels_last
    preds, dices = [], []
    for ck in ckpts:
        model = kd.to_device(kd.build_model(ck), device)
        with torch.no_grad(), kd.autocast(device, dtype):
            lesion = model(x).float().softmax(1)[:, 1:] >= 0.5
        preds.append(lesion[:, 0].cpu().numpy())
        dices.append(kd.dice_iou(lesion, y)[0].cpu().numpy())
    titles = ["image", "ground truth (green)", "Teacher (red)", "Student alone", f"{best} (best KD)"]
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
    """Run with command-line words `argv`; returns dict(summary, gap, table, ran), `ran` listing the
    (row, fold) runs this call trained (none when everything was done already)."""
    args, given = kd.parse_args(OPTIONS, __doc__, argv)
    kd.choose_data(args, given, PHANTOM_DEMO)
    if args.folds < 2:
        raise UserError(f"--folds {args.folds}: need at least 2 folds")
    folds = sorted({int(f) for f in _choose(args.fold_list, [str(f) for f in range(args.folds)], "fold_list")})
    chosen = set(_choose(args.rows, list(ROWS), "rows")) | {"Teacher", "Student"}
    chosen |= {ROWS[r]["teacher"] for r in chosen if "teacher" in ROWS[r]}  # a _WAug row needs its teacher
    rows = [r for r in ROWS if r in chosen]  # the paper's order, teachers first
    if args.pictures < 0 or args.n_perm < 1:
        raise UserError("--pictures must be >= 0 and --n_perm >= 1")
    for f in folds:
        os.makedirs(os.path.join(args.out, f"fold{f}"), exist_ok=True)

    records, ran, total = {}, [], len(folds) * len(rows)
    try:
        for f in folds:
            for row in rows:
                rec, did = run_one(row, f, args, f"[{len(records) + 1}/{total}]")
                records[row, f] = rec
                if did:
                    ran.append((row, f))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(ran)} runs finished and saved in {args.out}; "
              f"run the same command again to go on", flush=True)
        raise SystemExit(130) from None

    summary, gap = summarise(records, rows, folds, args.n_perm, args.perm_seed)
    table = format_table(summary, gap, args, folds)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    _write_json(os.path.join(args.out, "results.json"),
                dict(options=vars(args), folds=folds, rows=summary, teacher_minus_student=gap, runs_this_call=ran))
    print(f"\n{table}\n\n{len(ran)} runs trained by this call, {len(records) - len(ran)} reused; "
          f"wrote {os.path.join(args.out, 'table.md')} and results.json")
    distilled = [r for r in DISTILLED if r in summary]
    if args.pictures and distilled:
        best = max(distilled, key=lambda r: summary[r]["dice_mean"])
        make_pictures(args, folds[0], best, os.path.join(args.out, "pictures.png"))
    return dict(summary=summary, gap=gap, table=table, ran=ran)


if __name__ == "__main__":
    kd.run(main)
