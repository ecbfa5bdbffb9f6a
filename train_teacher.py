"""Train the U-Net teacher on BUSI (or the built-in phantom), save it, print test Dice/IoU.

    python train_teacher.py                      # BUSI at data/Dataset_BUSI_with_GT, else the phantom
    python train_teacher.py --data ~/BUSI/Dataset_BUSI_with_GT --fold 1 --out out/teacher_fold1.pt
    python train_teacher.py --epochs 500 --patience 50 --batch_size 64   # the paper's schedule
    python train_teacher.py --resume             # go on with a run that was stopped or killed
    python train_teacher.py --only_class benign  # a class teacher (T2KD): the benign images of the split

The checkpoint holds the split, so train_student.py distils on exactly the same images.
Files: while it trains, the run's state is saved after every epoch to OUT with .run.pt for .pt
(out/teacher.run.pt); --resume goes on from there. The checkpoint OUT itself is written only when
the run ends (finished, early-stopped, or Ctrl-C), so an older checkpoint at OUT is kept until then.
"""
from data import UserError
import kd
from losses import supervised_loss
from models import UNet, count_parameters

OPTIONS = [  # (name, default, help[, choices]): every default in one place
    ("data", kd.DEFAULT_DATA, "BUSI folder (Dataset_BUSI_with_GT), a folder with images/ and masks/ "
     "(or original/ and GT/), or 'phantom'"),
    ("classes", "benign,malignant", "BUSI classes to use, comma-separated; add normal for all 780 images"),
    ("size", 224, "images are resized to size x size (the paper: 224)"),
    ("folds", 3, "k of the k-fold split (the paper: 3-fold cross-validation)"),
    ("fold", 0, "which fold is the test part, 0..folds-1"),
    ("val_fraction", 0.15, "share of the training part held out for early stopping"),
    ("data_seed", 0, "seed of the split (and of the phantom)"),
    ("phantom_count", 240, "number of phantom images"),
    ("near_dup", 0.95, "images whose 32x32 thumbnails correlate above this are near-copies: one group, never "
     "split apart (0: exact copies only, as splits made before this option)"),
    ("split", str, "a split file written by --save_split: use its folds instead of making them from --data_seed"),
    ("save_split", str, "write every fold's split (image names, seed, data fingerprint) to this JSON file, and exit"),
    ("only_class", str, "train (and test) on this class's images only: a class teacher for T2KD; the split is "
     "still made from all --classes, so a student's test part is the same"),
    ("width", 64, "U-Net width w, levels w..16w: 64 = 31.0M params, 112 = 95.0M (the paper's teacher scale)"),
    ("aug", "strong", "teacher's augmentation: the paper's _WAug rows distil from a 'weak' teacher",
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
    ("dice_weight", 0.0, "weight of an added soft-Dice term in L_sup (the paper: 0, cross-entropy only)"),
    ("seed", 0, "seed of weights, batch order and augmentation"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "mixed precision: auto, bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("compile", False, "torch.compile the training forward pass (faster on GPUs after a warm-up)"),
    ("resume", False, "go on with the unfinished run saved at OUT's .run.pt (same options, data and split)"),
    ("out", "out/teacher.pt", "where the checkpoint goes (written when the run ends)"),
]
# When no BUSI is present: the phantom, small and short enough for a laptop CPU, with a learning
# rate ten times the paper's so that short runs get somewhere.
PHANTOM_DEMO = dict(size=96, width=24, epochs=16, batch_size=8, lr=1e-3)


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the checkpoint's contents."""
    # 1. Options, data and split
    args, given = kd.parse_args(OPTIONS, __doc__, argv)
    kd.choose_data(args, given, PHANTOM_DEMO)
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    seed = kd.run_seed(args.seed, args.fold)  # weights and data stream of this fold and seed
    kd.seed_everything(seed)
    data, splits = kd.load_split_data(args)
    if args.save_split:
        kd.save_splits(args.save_split, data, splits, args.data_seed, args.near_dup)
        print(f"wrote {args.save_split}: {len(splits)} folds of {len(data)} images; train with --split {args.save_split}")
        return None
    split = splits[args.fold]  # the checkpoint keeps the whole split: the student checks it
    own = kd.only_class(split, data, args.only_class)  # what this teacher trains and is tested on
    images, masks = data.images.to(device), data.masks.to(device)

    # 2. The model
    model = kd.to_device(UNet(args.width), device)
    n_params = count_parameters(model)
    print(f"teacher: U-Net width {args.width}, {kd.fmt_params(n_params)} parameters; "
          f"device {device}, precision {kd.precision_name(dtype)}")
    forward = kd.maybe_compile(model, args.compile)

    def step(x, y, idx):
        return dict(loss=supervised_loss(forward(x).float(), y, args.dice_weight))

    # 3. Train, going on from a saved state with --resume
    tag = kd.run_tag(args, data, split)
    run = kd.fit(model, images, masks, own, step, device=device, dtype=dtype, epochs=args.epochs,
                 patience=args.patience, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                 warmup=args.warmup, select=args.select, aug=args.aug, seed=seed,
                 dice_weight=args.dice_weight, state_path=kd.state_path(args.out),
                 resume=kd.resume_state(args, tag), tag=tag)

    # 4. Test the best weights, save, report
    model.load_state_dict(run["best_state"])
    test = kd.evaluate(model, images, masks, own["test"], device, dtype, args.batch_size, args.dice_weight)
    test.update(names=[data.names[i] for i in own["test"]], train_seconds=run["train_seconds"])
    ckpt = kd.make_checkpoint("teacher", model, args, data, split, parameters=n_params, epoch=run["best_epoch"],
                              history=run["history"], val=run["best_val"], test=test, stopped=run["stopped"],
                              precision=kd.precision_name(dtype), machine=kd.machine_name(device))
    kd.finish(args, ckpt, run["stopped"])
    print(f"teacher test ({len(own['test'])} {args.only_class + ' ' if args.only_class else ''}images, fold {args.fold}): "
          f"Dice {100 * test['dice']:.2f} +- {100 * test['dice_std']:.2f}, IoU {100 * test['iou']:.2f}; "
          f"{kd.fmt_params(n_params)} parameters; best epoch {run['best_epoch']}; "
          f"trained {kd.fmt_time(run['train_seconds'])}; saved {args.out}")
    return ckpt


if __name__ == "__main__":
    kd.run(main)
