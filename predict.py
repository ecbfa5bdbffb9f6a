"""Segment your own ultrasound images with a trained teacher or student: masks, overlays, time per
frame; and export the model for deployment with torch alone.

    python predict.py --checkpoint out/student_logits_kld.pt scans/           # every image in a folder
    python predict.py --checkpoint out/teacher.pt a.png b.jpg --out masks/ --probability
    python predict.py --checkpoint out/student_logits_kld.pt scans/ --amp off  # plain fp32
    python predict.py --checkpoint out/student_logits_kld.pt --export out/student.ts

For each image NAME.ext it writes OUT/NAME_mask.png (0 background, 255 lesion, at the image's own
size) and OUT/NAME_overlay.png (the lesion's outline drawn over the grey image); with --probability
also OUT/NAME_probability.png, the lesion probability p at the image's own size in 8 bits,
round(255 p). In a folder, files whose names hold "_mask", "_overlay" or "_probability" (BUSI's
ground truth, our own outputs) are skipped. A run in which every mask comes out empty ends with a
warning naming the likely causes.

Preprocessing is exactly training's: grey ("L"), resized to the checkpoint's size x size
(bilinear), /255, per-image normalisation, channels_last. The model runs in its fast inference
form (models.fast_model): BatchNorm folded into the convolutions, weights and activations in bf16
where the device computes bf16 natively (runs.amp_dtype), fp32 elsewhere or with --amp off. Its
lesion probability, size x size, is upsampled bilinearly to the image's own size and only then
thresholded (--threshold): the mask's edge is smooth, not a staircase of enlarged model pixels.

--export FILE.ts writes the fast form, in fp32 for portability, as TorchScript (torch.jit.trace):
torch alone loads it, in Python or in C++ (libtorch), without this project. It takes normalised
images (N, 1, S, S) float32 and returns the lesion probability (N, 1, S, S); the file's meta.json
states S, the preprocessing and the threshold. predict.py checks the file against the checkpoint's
own model on sample images (the images given, else a few built-in phantom images) and prints the
largest difference in lesion probability and the milliseconds per frame of each. To use it:

    meta = {"meta.json": ""}  # filled in by torch.jit.load: json.loads(meta["meta.json"])
    model = torch.jit.load("out/student.ts", _extra_files=meta)
    probability = model(x)    # x preprocessed as meta says; mask = probability >= its threshold
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import runs
from data import UserError, listdir, make_phantom, normalize, open_image
from models import count_parameters, fast_model, lesion_probability

DEFAULTS = dict(  # every default in one place
    checkpoint="out/student_logits_kld.pt",
    out="out/predictions",
    device="auto",
    amp="auto",
    threshold=0.5,
    probability=False,
)


def options():
    """The command line, in plain argparse; the defaults are DEFAULTS."""
    p = runs.parser(__doc__, DEFAULTS)
    add = p.add_argument
    add("--checkpoint", help="teacher or student checkpoint (train_teacher.py, train_student.py)")
    add("--out", help="folder for NAME_mask.png, NAME_overlay.png (and NAME_probability.png)")
    add("--device", help="auto (cuda, then mps, then cpu), or a torch device")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], help="precision: auto (bf16 where native), bf16, fp16 or "
        "off (fp32)")
    add("--threshold", type=float, help="a pixel is lesion when its lesion probability is >= threshold")
    add("--probability", action=argparse.BooleanOptionalAction, help="also write NAME_probability.png: the lesion "
        "probability at the image's size, round(255 p)")
    add("--export", help="write the fast form (fp32) as TorchScript to this .ts file, checked against the checkpoint "
        "and timed on the images given, else on built-in phantom images; see the top of this help")
    add("inputs", nargs="*", help="image files or folders")
    return p
CONTOUR_COLOUR = (255, 200, 0)  # yellow: visible on grey tissue and on dark lesions alike
IMAGE_EXTENSIONS = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}  # what Pillow reads


# ----------------------------------------------------------------------------- files in, files out

def list_images(inputs):
    """Files named, and the image files of folders named, in order; a one-line error otherwise."""
    if not inputs:
        raise UserError("no input images: give image files or folders, e.g. python predict.py scans/ "
                        "(or --export FILE.ts alone to export the model)")
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in listdir(path)
                     if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                     and not any(tag in f for tag in ("_mask", "_overlay", "_probability"))]
            if not found:
                raise UserError(f"{path}: no images in this folder (.png, .jpg, .bmp, .tif, ...); give another folder or files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder; check the path")
    return list({os.path.abspath(f): f for f in files}.values())  # a file named twice is done once


def output_names(files, out):
    """(OUT/NAME_mask.png, OUT/NAME_overlay.png, OUT/NAME_probability.png) per file; two inputs with
    one NAME are refused."""
    names, seen = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem in seen:
            raise UserError(f"{f}: same name as {seen[stem]}, both would write {stem}_mask.png; "
                            f"rename one or predict them in separate runs")
        seen[stem] = f
        names.append(tuple(os.path.join(out, f"{stem}_{what}.png") for what in ("mask", "overlay", "probability")))
    return names


def preprocess(image, size, device):
    """PIL grey image -> (1, 1, size, size) float on `device`, as training prepares its batches
    (data._load_pair resizes, kd.batch scales, normalises and goes channels_last)."""
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(pixels.copy())[None, None].to(device)
    return normalize(x.float() / 255).contiguous(memory_format=torch.channels_last)


def to_image_size(probability, image_size):
    """Lesion probability (1, 1, S, S) -> (H, W) at image_size = (W, H), PIL's order: bilinear with
    half-pixel centres (align_corners=False), the geometry of PIL's resize that made the S x S input.
    Thresholding this, not the S x S map, gives a mask whose edge is the probability's smooth level
    line instead of a staircase of enlarged model pixels."""
    width, height = image_size
    return F.interpolate(probability, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def mask_pixels(probability, threshold):
    """Probability (H, W) -> uint8 array, 255 where probability >= threshold, else 0."""
    return (probability >= threshold).to(torch.uint8).mul_(255).cpu().numpy()


def probability_pixels(probability):
    """Probability (H, W) in [0, 1] -> uint8 array round(255 p)."""
    return (probability * 255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def overlay(image, mask):
    """The grey image in RGB with the mask's outline drawn over it, about 0.4% of the image wide."""
    edge = Image.fromarray(mask).filter(ImageFilter.FIND_EDGES)  # non-zero where the mask changes
    thick = 2 * max(1, round(min(image.size) / 250)) + 1
    edge = edge.filter(ImageFilter.MaxFilter(thick)).point(lambda v: 255 if v else 0)
    return Image.composite(Image.new("RGB", image.size, CONTOUR_COLOUR), image.convert("RGB"), edge)


# ----------------------------------------------------------------------------- export for deployment

EXPORT_SUFFIX = ".ts"
SAMPLES = 4  # built-in phantom images that check and time an export made without input images


class ProbabilityNet(nn.Module):
    """What an exported file holds: a U-Net and its lesion probability, (N, 1, S, S) -> (N, 1, S, S)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last)).float().softmax(dim=1)[:, 1:]


def check_export_name(path):
    """--export: a .ts file name whose folder can be made; a one-line error otherwise."""
    if os.path.splitext(path)[1].lower() != EXPORT_SUFFIX:
        raise UserError(f"--export {path}: name a TorchScript file ending {EXPORT_SUFFIX}, "
                        f"e.g. --export out/student.ts")
    if os.path.isdir(path):
        raise UserError(f"--export {path}: is a folder; name a file in it, "
                        f"e.g. --export {os.path.join(path, 'student.ts')}")
    folder = os.path.dirname(path)
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--export {path}: {folder} is a file, not a folder; name another path")


def export_metadata(ckpt, checkpoint_path, threshold):
    """meta.json of an exported file: what a user of torch alone needs to prepare its input and read its
    output."""
    size = runs.image_size(ckpt)
    return dict(
        format="TorchScript (torch.jit.trace) of the fast inference form: BatchNorm folded into the "
               "convolutions, fp32 weights",
        load='meta = {"meta.json": ""}; model = torch.jit.load(FILE, _extra_files=meta); '
             'json.loads(meta["meta.json"])',
        input=f"(N, 1, {size}, {size}) float32, preprocessed as below; any N",
        output=f"(N, 1, {size}, {size}) float32: lesion probability in [0, 1]",
        size=size,
        preprocessing=["grey: PIL Image.convert('L')",
                       f"resize to {size} x {size}, bilinear (PIL Image.BILINEAR); the aspect ratio is not kept",
                       "float pixels / 255",
                       "per image: x = (x - x.mean()) / (x.std() + 1e-6), std unbiased (torch.std)"],
        threshold=threshold,
        postprocessing="lesion mask = probability >= threshold; for a mask at the image's own size, first "
                       "upsample the probability bilinearly (torch.nn.functional.interpolate, align_corners=False)",
        kind=ckpt["kind"], width=ckpt["model_config"]["width"], trained_on=str(ckpt["args"].get("data")),
        checkpoint=os.path.basename(checkpoint_path), torch=str(torch.__version__),
    )


def ms_per_frame(fn, x, device, warmup=3, repeats=20):
    """Median milliseconds of fn(x) over `repeats` calls after `warmup` calls, the device synchronised
    around each call."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            runs.sync(device)
            t0 = time.perf_counter()
            fn(x)
            runs.sync(device)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[warmup:])


def export(path, ckpt, args, device, dtype, fast, samples, what):
    """Write the checkpoint's model to `path` as TorchScript (fp32, BatchNorm folded, meta.json
    inside), load it back as a user would, and print its largest difference in lesion probability
    from the checkpoint's own eager model on `samples` (normalised (N, 1, S, S) on `device`) and the
    ms per frame of each. Returns (largest difference, {name: ms per frame})."""
    eager = runs.build_model(ckpt)  # as trained: fp32, BatchNorm unfolded
    net = ProbabilityNet(fast_model(eager, torch.device("cpu"), None)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer torch calls TorchScript deprecated, still loads it
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Up's pad-to-skip test: fixed at S x S, the input
        traced = torch.jit.trace(net, samples[:1].cpu())
        meta = json.dumps(export_metadata(ckpt, args.checkpoint, args.threshold), indent=1)
        runs.atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files={"meta.json": meta}))
        loaded = torch.jit.load(path, map_location=device).eval()  # what a user gets
    eager = eager.to(device)
    with torch.inference_mode():
        diff = (loaded(samples) - eager(samples).float().softmax(dim=1)[:, 1:]).abs().max().item()
    one, precision = samples[:1], runs.precision_name(dtype, autocast=False)
    fast32 = fast if dtype is None else fast_model(eager, device, None)  # like for like with the file
    ms = {"exported": ms_per_frame(loaded, one, device),
          "fast fp32": ms_per_frame(lambda x: lesion_probability(fast32, x), one, device)}
    if dtype is not None:
        ms[f"fast {precision}"] = ms_per_frame(lambda x: lesion_probability(fast, x), one, device)
    ms["eager"] = ms_per_frame(lambda x: eager(x).float().softmax(dim=1)[:, 1:], one, device)
    print(f"exported {path} ({os.path.getsize(path) / 2 ** 20:.2f} MiB): TorchScript, fp32, BatchNorm folded; "
          f"input (N, 1, {one.shape[-1]}, {one.shape[-1]}) normalised, output lesion probability; preprocessing "
          f"and threshold {args.threshold} in its meta.json")
    print(f"checked on {len(samples)} {what}: largest difference in lesion probability from the checkpoint's "
          f"eager model {diff:.2g}")
    print(f"ms per frame on {device} (batch 1, median of 20 after warm-up): exported {ms['exported']:.2f}; eager: "
          + ", ".join(f"{k} form {v:.2f}" for k, v in ms.items() if k.startswith("fast"))
          + f" (predict.py runs fast {precision}), as trained {ms['eager']:.2f} (fp32, BatchNorm unfolded)")
    return diff, ms


# ----------------------------------------------------------------------------- main

def empty_warning(count, threshold, ckpt):
    """The one-line warning after a run in which every mask came out empty."""
    trained_on, size = str(ckpt["args"].get("data")), runs.image_size(ckpt)
    phantom = " (this checkpoint was: --data phantom)" if trained_on == "phantom" else ""
    return (f"warning: all {count} masks are empty, no pixel reached --threshold {threshold}. Likely causes: "
            f"a model trained on the built-in phantom run on real scans{phantom}; a threshold too high "
            f"(try a lower --threshold); images unlike the training data (it saw {trained_on} at "
            f"{size}x{size}: another modality, or another size or zoom of scan)")


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns a list of (input, mask file)."""
    args = options().parse_args(argv)
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold}: give a probability between 0 and 1, e.g. 0.5")
    if args.export is not None:
        check_export_name(args.export)
    files = list_images(args.inputs) if args.inputs or args.export is None else []
    outputs = output_names(files, args.out)
    ckpt = runs.load_checkpoint(args.checkpoint, ("student", "teacher"), "--checkpoint")
    device = runs.pick_device(args.device)
    dtype = runs.amp_dtype(device, args.amp)
    size = runs.image_size(ckpt)
    model = fast_model(runs.build_model(ckpt), device, dtype)
    print(f"{ckpt['kind']} {args.checkpoint}: U-Net width {ckpt['model_config']['width']}, "
          f"{runs.fmt_params(count_parameters(model))} parameters, input {size}x{size}; device {device}, "
          f"{runs.precision_name(dtype, autocast=False)}, BatchNorm folded; {len(files)} image{'s' * (len(files) != 1)}")
    lesion_probability(model, torch.zeros(1, 1, size, size, device=device))  # warm-up: kernels chosen once
    if files and os.path.isfile(args.out):
        raise UserError(f"--out {args.out}: that is a file; give a folder for the masks")
    if files:
        os.makedirs(args.out, exist_ok=True)
    times, written, empty, t_start = [], [], 0, time.perf_counter()
    for path, (mask_path, overlay_path, probability_path) in zip(files, outputs):
        image = open_image(path, "L")  # a corrupt file: the same one-line error as in training
        x = preprocess(image, size, device)
        runs.sync(device)
        t0 = time.perf_counter()
        probability = to_image_size(lesion_probability(model, x), image.size)
        mask = mask_pixels(probability, args.threshold)
        times.append(time.perf_counter() - t0)  # .cpu() waited for the device
        Image.fromarray(mask).save(mask_path)
        overlay(image, mask).save(overlay_path)
        if args.probability:
            Image.fromarray(probability_pixels(probability)).save(probability_path)
        written.append((path, mask_path))
        empty += not mask.any()
        print(f"{path}: lesion {100 * (mask > 0).mean():.1f}% of the image, {1000 * times[-1]:.1f} ms -> {mask_path}")
    if files:
        print(f"{len(files)} image{'s' * (len(files) > 1)}: {1000 * statistics.median(times):.1f} ms per frame "
              f"(median; model at {size}x{size}, probability upsampled and thresholded at the image's size, on "
              f"{device}); {time.perf_counter() - t_start:.1f}s in all with reading and writing; masks and overlays"
              f"{' and probabilities' * args.probability} in {args.out}")
    if files and empty == len(files):
        print(empty_warning(len(files), args.threshold, ckpt), file=sys.stderr)
    if args.export is not None:
        if files:
            samples = torch.cat([preprocess(open_image(f, "L"), size, device) for f in files[:SAMPLES]])
            what = "of the images given"
        else:
            samples = normalize(make_phantom(SAMPLES, size, seed=0).images.float().to(device) / 255)
            what = "built-in phantom images"
        export(args.export, ckpt, args, device, dtype, model, samples, what)
    return written


if __name__ == "__main__":
    runs.exit_on_error(main)
