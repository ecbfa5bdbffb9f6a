"""Train the U-Net teacher on BUSI (or the built-in phantom), save it, print test Dice/IoU.

    python train_teacher.py                      # BUSI at data/Dataset_BUSI_with_GT, else the phantom
    python train_teacher.py --data ~/BUSI/Dataset_BUSI_with_GT --fold 1 --out out/teacher_fold1.pt
    python train_teacher.py --schedule constant --lr 1e-4 --epochs 500 --patience 50 --batch_size 64 \
                            --select loss        # the paper's schedule
    python train_teacher.py --resume             # go on with a run that was stopped or killed
    python train_teacher.py --only_class benign  # a class teacher (T2KD): the benign images of the split

The checkpoint holds the split, so train_student.py distils on exactly the same images.
Files: while it trains, the run's state is saved after every epoch to OUT with .run.pt for .pt
(out/teacher.run.pt); --resume goes on from there. The checkpoint OUT itself is written only when
the run ends (finished, early-stopped, or Ctrl-C), so an older checkpoint at OUT is kept until then.
"""
import argparse

from data import UserError
import kd
import runs
from losses import supervised_loss
from models import UNet, count_parameters

DEFAULTS = dict(  # every default in one place
    data=runs.DEFAULT_DATA,
    classes="benign,malignant",
    size=224,
    folds=3,
    fold=0,
    val_fraction=0.15,
    data_seed=0,
    phantom_count=240,
    near_dup=0.95,
    width=64,
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
    resume=False,
    out="out/teacher.pt",
)
# When no BUSI is present: the phantom, small and short enough for a laptop CPU.
PHANTOM_DEMO = dict(size=96, width=24, epochs=16, batch_size=8)


def options():
    """The command line, in plain argparse; the defaults are DEFAULTS."""
    p = runs.parser(__doc__, DEFAULTS)
    add = p.add_argument
    add("--data", help="BUSI folder (Dataset_BUSI_with_GT), a folder with images/ and masks/ (or original/ and GT/), "
        "or 'phantom'")
    add("--classes", help="BUSI classes to use, comma-separated; add normal for all 780 images")
    add("--size", type=int, help="images are resized to size x size (the paper: 224)")
    add("--folds", type=int, help="k of the k-fold split (the paper: 3-fold cross-validation)")
    add("--fold", type=int, help="which fold is the test part, 0..folds-1")
    add("--val_fraction", type=float, help="share of the training part held out for validation: the kept epoch, early "
        "stopping")
    add("--data_seed", type=int, help="seed of the split (and of the phantom)")
    add("--phantom_count", type=int, help="number of phantom images")
    add("--near_dup", type=float, help="images whose 32x32 thumbnails correlate above this are near-copies: one "
        "group, never split apart (0: exact copies only, as splits made before this option)")
    add("--split", help="a split file written by --save_split: use its folds instead of making them from --data_seed")
    add("--save_split", help="write every fold's split (image names, seed, data fingerprint) to this JSON file, and "
        "exit")
    add("--only_class", help="train (and test) on this class's images only: a class teacher for T2KD; the split is "
        "still made from all --classes, so a student's test part is the same")
    add("--width", type=int, help="U-Net width w, levels w..16w: 64 = 31.0M params, 112 = 95.0M (the paper's teacher "
        "scale)")
    add("--aug", choices=["none", "weak", "strong"], help="teacher's augmentation: the paper's _WAug rows distil "
        "from a 'weak' teacher")
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
    add("--dice_weight", type=float, help="weight of an added soft-Dice term in L_sup (the paper: 0, cross-entropy "
        "only)")
    add("--seed", type=int, help="seed of weights, batch order and augmentation")
    add("--device", help="auto (cuda, then mps, then cpu), or a torch device")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision: auto, bf16, fp16 or off (fp32)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the training forward pass (faster on "
        "GPUs after a warm-up)")
    add("--resume", action=argparse.BooleanOptionalAction, help="go on with the unfinished run saved at OUT's "
        ".run.pt (same options, data and split)")
    add("--out", help="where the checkpoint goes (written when the run ends)")
    return p


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the checkpoint's contents."""
    # 1. Options, data and split
    p = options()
    args = runs.choose_data(p, argv, p.parse_args(argv), PHANTOM_DEMO)
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    device = runs.pick_device(args.device)
    dtype = runs.amp_dtype(device, args.amp)
    seed = runs.run_seed(args.seed, args.fold)  # weights and data stream of this fold and seed
    runs.seed_everything(seed)
    data, splits = runs.load_split_data(args)
    if args.save_split:
        runs.save_splits(args.save_split, data, splits, args.data_seed, None if args.split else args.near_dup)
        print(f"wrote {args.save_split}: {len(splits)} folds of {len(data)} images; train with --split {args.save_split}")
        return None
    split = splits[args.fold]  # the checkpoint keeps the whole split: the student checks it
    own = runs.only_class(split, data, args.only_class)  # what this teacher trains and is tested on
    images, masks = data.images.to(device), data.masks.to(device)

    # 2. The model
    model = runs.to_device(UNet(args.width), device)
    n_params = count_parameters(model)
    print(f"teacher: U-Net width {args.width}, {runs.fmt_params(n_params)} parameters; "
          f"device {device}, precision {runs.precision_name(dtype)}")
    forward = runs.maybe_compile(model, args.compile)

    def step(x, y, idx):
        return dict(loss=supervised_loss(forward(x).float(), y, args.dice_weight))

    # 3. Train, going on from a saved state with --resume
    tag = runs.run_tag(args, data, split, device)
    fitted = kd.fit(model, images, masks, own, step, device=device, dtype=dtype, epochs=args.epochs,
                 patience=args.patience, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                 warmup=args.warmup, select=args.select, aug=args.aug, seed=seed,
                 dice_weight=args.dice_weight, resume=runs.resume_state(args, tag),
                 save=runs.state_saver(runs.state_path(args.out), tag))

    # 4. Test the best weights, save, report
    model.load_state_dict(fitted["best_state"])
    test = kd.evaluate(model, images, masks, own["test"], device, dtype, args.batch_size, args.dice_weight)
    test.update(names=runs.names_per_part(own, data)["test"], train_seconds=fitted["train_seconds"])
    ckpt = runs.make_checkpoint("teacher", model, args, data, split, parameters=n_params, epoch=fitted["best_epoch"],
                                history=fitted["history"], val=fitted["best_val"], test=test, stopped=fitted["stopped"],
                                precision=runs.precision_name(dtype), machine=runs.machine_name(device))
    runs.finish(args, ckpt, fitted["stopped"])
    print(f"teacher test ({len(own['test'])} {args.only_class + ' ' if args.only_class else ''}images, fold {args.fold}): "
          f"Dice {100 * test['dice']:.2f} +- {100 * test['dice_std']:.2f}, IoU {100 * test['iou']:.2f}; "
          f"{runs.fmt_params(n_params)} parameters; best epoch {fitted['best_epoch']} ({fitted['stopped']}); "
          f"trained {kd.fmt_time(fitted['train_seconds'])}; saved {args.out}")
    return ckpt


if __name__ == "__main__":
    runs.exit_on_error(main)
