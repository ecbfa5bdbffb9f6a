"""Segment your own ultrasound images with a trained teacher or student: masks, overlays, time per frame.

    python predict.py --checkpoint out/student_logits_kld.pt scans/           # every image in a folder
    python predict.py --checkpoint out/teacher.pt a.png b.jpg --out masks/
    python predict.py --checkpoint out/student_logits_kld.pt scans/ --amp off  # plain fp32

For each image NAME.ext it writes OUT/NAME_mask.png (0 background, 255 lesion, at the image's own
size) and OUT/NAME_overlay.png (the lesion's outline drawn over the grey image). In a folder,
files whose names hold "_mask" or "_overlay" (BUSI's ground truth, our own outputs) are skipped.

Preprocessing is exactly training's: grey ("L"), resized to the checkpoint's size x size
(bilinear), /255, per-image normalisation, channels_last. The model runs in its fast inference
form: BatchNorm folded into the convolutions, weights and activations in bf16 where the device
computes bf16 natively (kd.amp_dtype), fp32 elsewhere or with --amp off.
"""
import copy
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageFilter

import kd
from data import UserError, _listdir, _open, normalize
from models import count_parameters

OPTIONS = [  # (name, default, help[, choices]): every default in one place; input paths are positional
    ("checkpoint", "out/student_logits_kld.pt", "teacher or student checkpoint (train_teacher.py, train_student.py)"),
    ("out", "out/predictions", "folder for NAME_mask.png and NAME_overlay.png"),
    ("device", "auto", "auto (cuda, then mps, then cpu), or a torch device"),
    ("amp", "auto", "precision: auto (bf16 where native), bf16, fp16 or off (fp32)", ["auto", "bf16", "fp16", "off"]),
    ("threshold", 0.5, "a pixel is lesion when its lesion probability is >= threshold"),
]
PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CONTOUR_COLOUR = (255, 200, 0)  # yellow: visible on grey tissue and on dark lesions alike
IMAGE_EXTENSIONS = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}  # what Pillow reads


# ----------------------------------------------------------------------------- the fast inference model

def fuse_for_inference(model):
    """A copy of `model` in eval mode with every BatchNorm2d that follows a Conv2d in an
    nn.Sequential folded into that convolution (the BN becomes nn.Identity).

    In eval mode BN is a fixed per-channel affine map y = s * (x - mean) + beta with
    s = gamma / sqrt(var + eps), so conv-then-BN is one convolution with weights w * s and bias
    s * (b - mean) + beta: same output up to float rounding, one pass over memory fewer.
    """
    f64 = lambda t: t.detach().cpu().double()  # fold in float64 on the CPU: no extra rounding (MPS has no float64)
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None):
                continue
            gamma = f64(bn.weight) if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
            beta = f64(bn.bias) if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
            s = gamma / (f64(bn.running_var) + bn.eps).sqrt()
            bias = f64(conv.bias) if conv.bias is not None else torch.zeros_like(s)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
            w = conv.weight
            fused.weight = nn.Parameter((f64(w) * s.view(-1, 1, 1, 1)).to(w))  # back to w's dtype and device
            fused.bias = nn.Parameter(((bias - f64(bn.running_mean)) * s + beta).to(w))
            seq[i], seq[i + 1] = fused, nn.Identity()
    return model


def fast_model(model, device, dtype):
    """The fastest eager form of a trained model: BatchNorm folded, channels_last, weights in
    `dtype` (None: fp32), frozen. After folding the net is only convolutions, ReLU, max-pool and
    concatenation, so bf16 weights compute what bf16 autocast would, without re-casting the
    weights at every call (2-core Xeon, student at 224: 6.1 ms vs 6.6 ms per frame)."""
    model = kd.to_device(fuse_for_inference(model), device).requires_grad_(False)
    return model.to(dtype) if dtype is not None else model


@torch.inference_mode()
def lesion_probability(model, x):
    """Normalised images (N, 1, S, S) -> lesion probability (N, 1, S, S) in float32."""
    dtype = next(model.parameters()).dtype
    return model(x.to(dtype)).float().softmax(dim=1)[:, 1:]


def sync(device):
    """Wait for the device's queued work, so a clock reading measures it (GPUs run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------- files in, files out

def list_images(inputs):
    """Files named, and the image files of folders named, in order; a one-line error otherwise."""
    if not inputs:
        raise UserError("no input images: give image files or folders, e.g. python predict.py scans/")
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in _listdir(path)
                     if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and "_mask" not in f and "_overlay" not in f]
            if not found:
                raise UserError(f"{path}: no images in this folder (.png, .jpg, .bmp, .tif, ...); give another folder or files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder; check the path")
    return list({os.path.abspath(f): f for f in files}.values())  # a file named twice is done once


def output_names(files, out):
    """OUT/NAME_mask.png and OUT/NAME_overlay.png per file; two inputs with one NAME are refused."""
    names, seen = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem in seen:
            raise UserError(f"{f}: same name as {seen[stem]}, both would write {stem}_mask.png; "
                            f"rename one or predict them in separate runs")
        seen[stem] = f
        names.append((os.path.join(out, stem + "_mask.png"), os.path.join(out, stem + "_overlay.png")))
    return names


def preprocess(image, size, device):
    """PIL grey image -> (1, 1, size, size) float on `device`, as training prepares its batches
    (data._load_pair resizes, kd.batch scales, normalises and goes channels_last)."""
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(pixels.copy())[None, None].to(device)
    return normalize(x.float() / 255).contiguous(memory_format=torch.channels_last)


def overlay(image, mask):
    """The grey image in RGB with the mask's outline drawn over it, about 0.4% of the image wide."""
    edge = Image.fromarray(mask).filter(ImageFilter.FIND_EDGES)  # non-zero where the mask changes
    thick = 2 * max(1, round(min(image.size) / 250)) + 1
    edge = edge.filter(ImageFilter.MaxFilter(thick)).point(lambda v: 255 if v else 0)
    return Image.composite(Image.new("RGB", image.size, CONTOUR_COLOUR), image.convert("RGB"), edge)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns a list of (input, mask file)."""
    args, _ = kd.parse_args(OPTIONS, __doc__, argv, ("inputs", "image files or folders"))
    inputs = args.inputs
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold}: give a probability between 0 and 1, e.g. 0.5")
    files = list_images(inputs)
    outputs = output_names(files, args.out)
    ckpt = kd.load_checkpoint(args.checkpoint, ("student", "teacher"), "--checkpoint")
    device = kd.pick_device(args.device)
    dtype = kd.amp_dtype(device, args.amp)
    size = ckpt["args"]["size"]
    model = fast_model(kd.build_model(ckpt), device, dtype)
    print(f"{ckpt['kind']} {args.checkpoint}: U-Net width {ckpt['model_config']['width']}, "
          f"{kd.fmt_params(count_parameters(model))} parameters, input {size}x{size}; device {device}, "
          f"{PRECISION[dtype]}, BatchNorm folded; {len(files)} image{'s' * (len(files) > 1)}")
    lesion_probability(model, torch.zeros(1, 1, size, size, device=device))  # warm-up: kernels chosen once
    os.makedirs(args.out, exist_ok=True)
    times, written, t_start = [], [], time.perf_counter()
    for path, (mask_path, overlay_path) in zip(files, outputs):
        image = _open(path, "L")  # a corrupt file: the same one-line error as in training
        x = preprocess(image, size, device)
        sync(device)
        t0 = time.perf_counter()
        mask = (lesion_probability(model, x)[0, 0] >= args.threshold).to(torch.uint8).mul_(255).cpu().numpy()
        times.append(time.perf_counter() - t0)  # .cpu() waited for the device
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))  # back to the image's size
        Image.fromarray(mask).save(mask_path)
        overlay(image, mask).save(overlay_path)
        written.append((path, mask_path))
        print(f"{path}: lesion {100 * (mask > 0).mean():.1f}% of the image, {1000 * times[-1]:.1f} ms -> {mask_path}")
    print(f"{len(files)} image{'s' * (len(files) > 1)}: {1000 * statistics.median(times):.1f} ms per frame (median, model and "
          f"threshold at {size}x{size} on {device}); {time.perf_counter() - t_start:.1f}s in all with reading "
          f"and writing; masks and overlays in {args.out}")
    return written


if __name__ == "__main__":
    kd.run(main)
