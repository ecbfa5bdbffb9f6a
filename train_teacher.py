"""Train the U-Net teacher on BUSI (or the built-in phantom), save it, print test Dice/IoU.

    python train_teacher.py                      # BUSI at data/Dataset_BUSI_with_GT, else the phantom
    python train_teacher.py --data ~/BUSI/Dataset_BUSI_with_GT --fold 1
    python train_teacher.py --epochs 500 --patience 50 --batch_size 64   # the paper's schedule

The checkpoint holds the split, so train_student.py distils on exactly the same images.
"""
import time

from data import UserError
import kd
from losses import supervised_loss
from models import UNet, count_parameters

OPTIONS = [  # (name, default, help[, choices]): every default in one place
    ("data", kd.DEFAULT_DATA, "BUSI folder (Dataset_BUSI_with_GT), a folder with images/ and masks/, or 'phantom'"),
    ("classes", "benign,malignant", "BUSI classes to use, comma-separated; add normal for all 780 images"),
    ("size", 224, "images are resized to size x size (the paper: 224)"),
    ("folds", 3, "k of the k-fold split (the paper: 3-fold cross-validation)"),
    ("fold", 0, "which fold is the test part, 0..folds-1"),
    ("val_fraction", 0.15, "share of the training part held out for early stopping"),
    ("data_seed", 0, "seed of the split (and of the phantom)"),
    ("phantom_count", 240, "number of phantom images"),
    ("width", 64, "U-Net width w, levels w..16w: 64 = 31.0M params, 112 = 95.0M (the paper's teacher scale)"),
    ("aug", "strong", "teacher's augmentation: the paper's _WAug rows distil from a 'weak' teacher",
     ["none", "weak", "strong"]),
    ("epochs", 100, "most epochs (the paper: 500)"),
    ("patience", 20, "early stopping: epochs without a better validation loss (the paper: 50)"),
    ("batch_size", 16, "images per step (the paper: 64)"),
    ("lr", 1e-4, "Adam learning rate (the paper: 1e-4)"),
    ("dice_weight", 0.0, "weight of an added soft-Dice term in L_sup (the paper: 0, cross-entropy only)"),
    ("seed", 0, "seed of weights, batch order and augmentation"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "mixed precision: auto, bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("compile", False, "torch.compile the training forward pass (faster on GPUs after a warm-up)"),
    ("out", "out/teacher.pt", "where the checkpoint goes"),
]
PHANTOM_DEMO = dict(size=128, epochs=8, batch_size=8)  # a CPU minute or two, when no BUSI is present


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns the checkpoint's contents."""
    args, given = kd.parse_args(OPTIONS, __doc__, argv)
    kd.choose_data(args, given, PHANTOM_DEMO)
    if not args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: give a file name ending in .pt")
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    kd.seed_everything(args.seed)
    data, split = kd.load_split_data(args)
    images, masks = data.images.to(device), data.masks.to(device)

    model = kd.to_device(UNet(args.width), device)
    n_params = count_parameters(model)
    print(f"teacher: U-Net width {args.width}, {kd.fmt_params(n_params)} parameters; "
          f"device {device}, precision {kd.precision_name(dtype)}")

    forward = kd.maybe_compile(model, args.compile)

    def step(x, y):
        return dict(loss=supervised_loss(forward(x).float(), y, args.dice_weight))

    meta = dict(parameters=n_params)  # what the checkpoint holds beside the weights

    def save(epoch, val):
        meta.update(epoch=epoch, val=val)
        ckpt = kd.make_checkpoint("teacher", model, args, data, split, **meta)
        kd.save_checkpoint(args.out, ckpt)
        return ckpt

    t0 = time.time()
    best_epoch, best_state, stopped = kd.fit(model, images, masks, split, step, args, device, dtype, save)
    train_time = time.time() - t0
    model.load_state_dict(best_state)
    test = kd.evaluate(model, images, masks, split["test"], device, dtype, args.batch_size, args.dice_weight)
    test.update(names=[data.names[i] for i in split["test"]], train_seconds=train_time)
    meta.update(test=test, stopped=stopped)
    ckpt = save(best_epoch, meta["val"])  # the best weights again, now with their test metrics
    print(f"teacher test ({len(split['test'])} images, fold {args.fold}): "
          f"Dice {100 * test['dice']:.2f} +- {100 * test['dice_std']:.2f}, IoU {100 * test['iou']:.2f}; "
          f"{kd.fmt_params(n_params)} parameters; best epoch {best_epoch}; trained {kd.fmt_time(train_time)}; "
          f"saved {args.out}")
    return ckpt


if __name__ == "__main__":
    kd.run(main)
