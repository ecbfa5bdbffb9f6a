"""The distillation chapter: how a small student learns from a frozen teacher.

Read top to bottom: batches of the data, Dice and the evaluation, the learning rate's schedule,
the training loop (`fit`, in the shape of minGPT's Trainer.run: plain arguments, a step function
that says what is learnt), and last the student's step for every pathway of the papers
(`make_step`): logits (L), bottleneck attention maps (H), the bottleneck through a regressor (HR),
both at once (T2KD's joint path), and decoupled contrastive distillation (DCKD). Each piece can be
copied out with the few names it uses; options, checkpoints and the rest of a command-line tool's
machinery live in runs.py.
"""
import math
import time

import numpy as np
import torch

from data import UserError, augment, draw, normalize
from losses import dckd_loss, distillation_loss, supervised_loss, total_loss
from models import ClassTeachers, Mirrored, Projector, Regressor


# ----------------------------------------------------------------------------- batches

def autocast(device, dtype):
    """Mixed precision where `dtype` (bf16, fp16) is given; plain fp32 when it is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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


def batch(data_images, data_masks, idx, aug="none", generator=None, drawn=None):
    """Index a batch out of the uint8 tensors on the device, augment it, normalise it. `drawn`: the
    augmentation's numbers (data.draw), when this batch is a second view of images already drawn."""
    masks = None if data_masks is None else data_masks[idx]
    x, y = augment(data_images[idx].float() / 255, masks, aug, generator, drawn)
    return normalize(x).contiguous(memory_format=torch.channels_last), y


def steps_per_epoch(n_train, batch_size):
    """How many batches `batches` makes of n_train images (a last batch of one joins the one before)."""
    n = math.ceil(n_train / batch_size)
    return n - 1 if n > 1 and n_train - (n - 1) * batch_size == 1 else n


# ----------------------------------------------------------------------------- Dice and evaluation

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


def lesion_mask(logits, threshold=0.5):
    """Where the lesion's softmax probability is at least `threshold`: (N, 2, H, W) -> (N, 1, H, W) bool."""
    return logits.float().softmax(dim=1)[:, 1:] >= threshold


@torch.no_grad()
def evaluate(model, images, masks, indices, device, dtype, batch_size=32, dice_weight=0.0, sup="ce"):
    """Supervised loss (the L_sup that trains: `sup` and `dice_weight`), per-image Dice and IoU (lesion
    probability >= 0.5) over every index: no image is dropped, the last batch may be smaller. Images
    are on the device already."""
    was_training = model.training
    model.eval()
    loss, dice, iou = 0.0, [], []
    for i in range(0, len(indices), batch_size):
        idx = torch.as_tensor(indices[i:i + batch_size], device=device)
        x, y = batch(images, masks, idx)
        with autocast(device, dtype):
            logits = model(x).float()
        loss = loss + supervised_loss(logits, y, dice_weight, sup) * len(idx)
        d, j = dice_iou(lesion_mask(logits), y)
        dice.append(d)
        iou.append(j)
    model.train(was_training)
    dice, iou = torch.cat(dice).cpu().numpy(), torch.cat(iou).cpu().numpy()
    return dict(loss=float(loss) / len(indices), dice=float(dice.mean()), dice_std=float(dice.std()),
                iou=float(iou.mean()), iou_std=float(iou.std()), per_image_dice=dice.tolist(),
                per_image_iou=iou.tolist())


def t_quantile(q, df):
    """The q-quantile of Student's t distribution with df degrees of freedom (q > 0.5): bisection
    on its CDF, 1/2 + the integral of the density from 0 to x (trapezoids on 20001 points)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda t: np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    cdf = lambda x: 0.5 + (density(np.linspace(0, x, 20001)).sum() - (density(0.0) + density(x)) / 2) * x / 20000
    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def paired_interval(d, level=0.95, units=None):
    """Mean of paired differences d and its t interval: mean +- t(1 - (1 - level)/2, n - 1) * sd / sqrt(n).
    units: each difference's group (near-copies of one image, nearly one image seen twice): the
    standard error is then clustered, sqrt(G / (G - 1) * sum over groups of (sum of its d - mean)^2) / n,
    with G - 1 degrees of freedom for G groups; with one difference per group it is sd / sqrt(n).
    Returns (mean, low, high); low and high are None for fewer than 2 pairs (or groups)."""
    d = np.asarray(d, dtype=np.float64)
    groups = len(d) if units is None else len(set(units))
    if groups < 2:
        return float(d.mean()) if len(d) else None, None, None
    if units is None:  # the standard error is spread / scale
        spread, scale = d.std(ddof=1), math.sqrt(len(d))
    else:
        sums = {}
        for x, u in zip(d - d.mean(), units):
            sums[u] = sums.get(u, 0.0) + x
        spread, scale = math.sqrt(groups / (groups - 1) * sum(v * v for v in sums.values())), len(d)
    half = t_quantile(1 - (1 - level) / 2, groups - 1) * spread / scale
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


# ----------------------------------------------------------------------------- the training loop

def lr_factor(step, total, warmup, schedule):
    """The learning rate at optimiser step `step` (0-based) of `total`, as a share of the base rate.
    constant: 1 throughout (the paper). cosine: a linear warm-up over the first `warmup` steps, then
    half a cosine that reaches 0 just after the last step: large steps while the weights are far
    from a good place, small ones to settle into it."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def lr_scheduler(opt, schedule, warmup, epochs, per_epoch):
    """The learning rate of `opt` per step, by lr_factor: `warmup` and `epochs` counted in epochs of
    `per_epoch` steps. Call its step() after every optimiser step."""
    total, warm = epochs * per_epoch, warmup * per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warm, schedule))


def fit(model, images, masks, split, step, *, device, dtype=None, extras=(), epochs=100, patience=20,
        batch_size=16, lr=1e-4, schedule="constant", warmup=0, select="loss", aug="strong", seed=0,
        dice_weight=0.0, sup="ce", generators=(), teacher_images=None, resume=None, save=None):
    """Train `model` and `extras` with Adam; step(x, y, idx) -> dict of losses, "loss" minimised. Keep the best
    validation epoch (`select`: "loss", "dice" or "last"; the validation loss is L_sup, by `sup` and
    `dice_weight`); stop after `patience` epochs without one. save(state) after every epoch.
    teacher_images: the same images at a teacher's higher resolution; each batch then has a second view,
    warped and shaded as the student's (its own noise), and the call is step(x, y, idx, x_teacher)."""
    modules = [model, *extras]
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)
    sched = lr_scheduler(opt, schedule, warmup, epochs, steps_per_epoch(len(split["train"]), batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    views = [] if teacher_images is None else [data_generator(device, seed + 1)]  # the teacher view's noise
    generators = [data_generator(device, seed), *views, *generators]  # the data stream's first, then the step's
    loop = dict(modules=modules, opt=opt, sched=sched, scaler=scaler, generators=generators)
    run = load_loop(resume, **loop) if resume is not None else new_run()
    train_idx, stopped = torch.as_tensor(split["train"], device=device), "last epoch"
    try:
        for epoch in range(run["epoch"] + 1, epochs + 1):
            t0, sums, counts = time.time(), {}, {}
            for m in modules:
                m.train()
            for idx in batches(train_idx, batch_size, generators[0]):
                drawn = draw(len(idx), aug, generators[0], device)
                x, y = batch(images, masks, idx, aug, generators[0], drawn)
                more = () if not views else (batch(teacher_images, None, idx, aug, views[0], drawn)[0],)
                with autocast(device, dtype):
                    parts = step(x, y, idx, *more)
                opt.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"]).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                for k, v in parts.items():  # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(idx)
                    counts[k] = counts.get(k, 0) + len(idx)  # a term only some batches have: its mean over those
            train = {k: float(v) / counts[k] for k, v in sums.items()}
            val = evaluate(model, images, masks, split["val"], device, dtype, batch_size, dice_weight, sup)
            check_finite(train["loss"], val["loss"], epoch, run["epoch"] if save else 0)
            end_epoch(run, epoch, model, train, val, select, opt.param_groups[0]["lr"], time.time() - t0)
            if save:
                save(loop_state(run, **loop))
            print_epoch(run, epochs, train)
            if epoch - run["best_epoch"] >= patience:  # early stopping
                stopped = "early stop"
                break
    except KeyboardInterrupt:
        if run["best_state"] is None:
            raise
        print(f"\ninterrupted: going on with the best weights (epoch {run['best_epoch']})")
        stopped = "interrupted"
    return dict(run, stopped=stopped, train_seconds=sum(run["seconds"]))  # best_epoch, best_state, best_val, history


def new_run():
    """The counters of a run that has not trained yet: the last epoch done, the best one so far
    (its score: lower is better), its weights and validation metrics, seconds and metrics per epoch."""
    return dict(epoch=0, best_score=math.inf, best_epoch=0, best_state=None, best_val=None, seconds=[], history=[])


def end_epoch(run, epoch, model, train, val, select, lr, seconds):
    """Book an epoch into `run`; keep the model's weights if its validation score is the best yet
    (select: lowest validation loss, highest validation Dice, or simply the latest epoch). lr: where
    the schedule stands after the epoch's last step (the next epoch's first rate)."""
    score = dict(loss=val["loss"], dice=-val["dice"], last=-epoch)[select]
    if score < run["best_score"]:
        run.update(best_score=score, best_epoch=epoch, best_val=val,
                   best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    run["epoch"] = epoch
    run["seconds"].append(seconds)
    run["history"].append(dict(epoch=epoch, lr=lr, train_loss=train["loss"], val_loss=val["loss"],
                               val_dice=val["dice"]))


def loop_state(run, modules, opt, sched, scaler, generators):
    """All that a stopped run needs to go on as if it had never stopped: weights, optimiser,
    schedule, grad scaler, random generators (the data stream's first) and the run's counters."""
    return dict(run=run, modules=[m.state_dict() for m in modules], optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), scaler=scaler.state_dict(), generator=generators[0].get_state(),
                generators=[g.get_state() for g in generators[1:]])


def load_loop(state, modules, opt, sched, scaler, generators):
    """Put a loop_state back into a run's parts; returns the run's counters."""
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


def check_finite(train_loss, val_loss, epoch, saved_epoch):
    """A loss that became NaN or infinite ends the run with one line that says what is kept."""
    for what, loss in (("training", train_loss), ("validation", val_loss)):
        if not math.isfinite(loss):
            kept = f"the state after epoch {saved_epoch} is saved (--resume)" if saved_epoch else "nothing was saved"
            raise FloatingPointError(f"{what} loss became {loss} at epoch {epoch}; {kept}; "
                                     f"to avoid it, start afresh with a lower --lr or --amp off")


def print_epoch(run, epochs, train):
    h, s = run["history"][-1], run["seconds"]
    left = (epochs - h["epoch"]) * (sum(s[1:]) / (len(s) - 1) if len(s) > 1 else s[0])  # epoch 1 also warms up
    comps = " ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
    best = run["best_val"]
    print(f"epoch {h['epoch']:3d}/{epochs} | lr {h['lr']:.1e} | train {train['loss']:.4f}"
          + (f" ({comps})" if comps else "")
          + f" | val loss {h['val_loss']:.4f} dice {100 * h['val_dice']:.1f} | best @ {run['best_epoch']} "
          + f"(loss {best['loss']:.4f} dice {100 * best['dice']:.1f}) | {s[-1]:.1f}s, at most {fmt_time(left)} left",
          flush=True)


def fmt_time(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


# ----------------------------------------------------------------------------- the student's step, every pathway

TERMS = {"logits": ["logits"], "hidden": ["hidden"], "hidden_regressor": ["hidden_regressor"],
         "joint": ["logits", "hidden_regressor"]}  # the paper's distillation terms each --pathway sums


def extra_modules(args, student, teacher, device):
    """(regressor, projector): what learns with the student for HR and for DCKD (else None). They
    are thrown away after training: not counted in, nor saved with, the student."""
    s, t = student.feature_channels, teacher.feature_channels
    hr = "hidden_regressor" in TERMS.get(args.pathway, [])
    regressor = Regressor(s["bottleneck"], t["bottleneck"]) if hr else None
    projector = Projector(s[args.dckd_level], t[args.dckd_level]) if args.pathway == "dckd" else None
    return [None if m is None else m.to(device, memory_format=torch.channels_last) for m in (regressor, projector)]


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

    def step(x, y, idx, x_teacher=None):  # x_teacher: the teacher's own view of the batch (kd.fit)
        s_logits, s_feats = student(x, return_features=True)
        l_sup = supervised_loss(s_logits.float(), y, args.dice_weight, args.sup)
        if args.pathway == "none":
            return dict(loss=l_sup)
        with torch.no_grad():
            t_logits, t_feats = teach(x if x_teacher is None else x_teacher, idx)
        if args.pathway == "dckd":
            terms = dckd_loss(projector(s_feats[args.dckd_level]), t_feats[args.dckd_level], y, anchor_generator,
                              args.anchors, args.negatives, args.tau, args.hard, args.delta)
            if terms is None:  # no lesion (or no background) position at this level's scale: L_sup alone
                return dict(loss=l_sup, sup=l_sup, skipped=torch.ones((), device=x.device))
            l_con, l_rank = terms
            return dict(loss=l_sup + args.lambda_con * l_con + args.lambda_rank * l_rank, sup=l_sup, con=l_con,
                        rank=l_rank, skipped=torch.zeros((), device=x.device))
        l_kd = sum(distillation_loss(p, args.loss, s_logits, s_feats, t_logits, t_feats, regressor, args.T)
                   for p in TERMS[args.pathway])
        return dict(loss=total_loss(l_kd, l_sup, args.alpha), sup=l_sup, kd=l_kd)

    step.generators = (anchor_generator,) if args.pathway == "dckd" else ()  # saved and restored by kd.fit
    return step


def class_indices(teacher, data, device):
    """For class teachers: each image's index into their members, on the device (else None). An
    image of a class without a teacher would get no teacher's output at all: refused at once."""
    if not isinstance(teacher, ClassTeachers):
        return None
    for c in dict.fromkeys(data.labels):
        if c not in teacher.classes:
            raise UserError(f"--class_teachers: the data holds {data.labels.count(c)} {c} images and no teacher of "
                            f"class {c}; add {c}=PATH (train_teacher.py --only_class {c}), or train without {c}")
    return torch.as_tensor([teacher.classes.index(c) for c in data.labels], device=device)
