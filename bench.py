"""Benchmark teacher and student: training throughput, TFLOP/s, inference latency, memory, data share.

    python bench.py                          # size 224, on the CPU and on the GPU if there is one
    python bench.py --device cpu --steps 3 --repeats 3
    python bench.py --device cuda --compile  # compiled training steps, and compiled inference added
    python bench.py --device cpu --profile   # and the profiler's table of the student's inference

Per device and model it prints a table, then one line per figure for scripts to parse:
    RESULT model=student device=cpu metric=infer_ms_fast value=5.21
Metrics: train_img_s (training images per second; the student's step is a distillation step:
its forward and backward plus the frozen teacher's forward, logits KLD, as in train_student.py),
train_tflops and train_peak_pct (achieved convolution TFLOP/s and share of the device's peak),
data_pct (share of a training step spent in kd.batch: indexing, augmentation, normalisation on the
device; under 5% means the device hardly waits on data), infer_ms_fp32 (batch 1, plain fp32 eager,
NCHW), infer_ms_fast (batch 1, the fast form predict.py runs, models.fast_model: BatchNorm folded,
channels_last, bf16 where native), infer_ms_compiled (--compile), train_mem_mib (peak memory of
training, see below).
Every time is a median of --repeats repeats, after a warm-up, with the device synchronised.
"""
import argparse
import copy
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

import kd
import runs
from data import UserError, make_phantom, normalize
from runs import sync
from losses import supervised_loss
from models import ClassTeachers, UNet, count_parameters, fast_model, lesion_probability
import train_student

try:
    import resource  # peak RSS on Linux and macOS; not on Windows
except ImportError:
    resource = None

DEFAULTS = dict(  # every default in one place
    size=224,
    batch_size=16,
    teacher_width=64,
    student_width=10,
    device="all",
    steps=5,
    repeats=3,
    warmup=2,
    aug="strong",
    amp="auto",
    compile=False,
    methods=False,
    profile=False,
    threads=0,
)


def options():
    """The command line, in plain argparse; the defaults are DEFAULTS."""
    p = runs.parser(__doc__, DEFAULTS)
    add = p.add_argument
    add("--size", type=int, help="images are size x size (the paper: 224)")
    add("--batch_size", type=int, help="training images per step (the training scripts' default)")
    add("--teacher_width", type=int, help="teacher U-Net width (64 = 31.0M parameters)")
    add("--student_width", type=int, help="student U-Net width (10 = 0.76M parameters)")
    add("--device", help="all (the CPU, and the GPU if there is one), or comma-separated: cpu,cuda,mps")
    add("--steps", type=int, help="timed training steps per repeat; inference: 4x as many single-frame calls")
    add("--repeats", type=int, help="timed repeats; every figure is their median")
    add("--warmup", type=int, help="untimed steps (and inference calls) first: kernel choice, caches, compilation "
        "(>= 1)")
    add("--aug", choices=["none", "weak", "strong"], help="augmentation inside the timed data step (the training "
        "scripts' default)")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], help="precision of training and of the fast inference: "
        "auto, bf16, fp16 or off (fp32)")
    add("--compile", action=argparse.BooleanOptionalAction, help="also torch.compile the training forward passes and "
        "the fast inference model")
    add("--methods", action=argparse.BooleanOptionalAction, help="also time the student's distillation step of each "
        "method (logits, logits with the fast teacher, HR, T2KD with two class teachers, DCKD) at the same "
        "size, train_student.py's own steps")
    add("--profile", action=argparse.BooleanOptionalAction, help="also print the PyTorch profiler's table of the "
        "student's fast inference: where the time goes")
    add("--threads", type=int, help="CPU threads, 0 = torch's default (one per core); 1 is far faster on a busy "
        "machine")
    add("--peak_tflops", type=float, help="the device's peak TFLOP/s for the share-of-peak column (default: dense "
        "bf16 of known GPUs, n/a on CPUs); applies to every --device")
    return p
METHODS = {  # train_student.py's words for each distillation step --methods times
    "logits": ["--pathway", "logits"],
    "logits_fast_teacher": ["--pathway", "logits", "--fast_teacher"],
    "hr": ["--pathway", "hidden_regressor"],
    "t2kd": ["--pathway", "joint", "--sup", "wb"],  # from two class teachers, half the images each
    "dckd": ["--pathway", "dckd"],
}
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}  # dense bf16 tensor cores; first match wins


# ----------------------------------------------------------------------------- counting FLOPs

def conv_flops(model, size):
    """FLOPs of the convolutions of one forward pass of one size x size image, counted as
    2 x multiply-adds of every Conv2d and ConvTranspose2d (a multiply-add is two operations):
        Conv2d           output elements x (in_channels / groups) x kernel area
        ConvTranspose2d  input elements x (out_channels / groups) x kernel area (each input
                         pixel is spread over a kernel-sized patch of the output)
    Bias adds, BatchNorm, ReLU, pooling and concatenation are left out (well under 1% here).
    A training step costs about 3 forward passes (forward, then gradients of activations and of
    weights); a distillation step 3 student forwards + 1 teacher forward (no_grad). Shapes only:
    it runs on a copy on the "meta" device, which computes nothing."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    meta = copy.deepcopy(model).to("meta").eval()
    flops = []

    def hook(m, inp, out):
        area = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            flops.append(2 * inp[0].numel() * (m.out_channels // m.groups) * area)
        else:
            flops.append(2 * out.numel() * (m.in_channels // m.groups) * area)

    for m in meta.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        meta(torch.zeros(1, convs[0].in_channels, size, size, device="meta"))
    return sum(flops)


def peak_tflops(device, given):
    """--peak_tflops if given; else the table's entry for a known GPU; else None (n/a)."""
    if given is not None:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


# ----------------------------------------------------------------------------- timing

def median_time(fn, device, warmup, repeats, calls):
    """Seconds per call of fn(): warm-up calls, then `repeats` timed runs of `calls` calls each,
    the device synchronised before and after each run; the median over runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device):
    """CUDA: the most memory tensors held (max_memory_allocated, since reset_memory). MPS: memory
    the driver holds now (MPS keeps no peak). CPU: the peak resident set size (RSS) of this whole
    process so far, so a later row includes what earlier rows held."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    if resource is None:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


MEMORY_KIND = {"cuda": "peak allocated (torch.cuda.max_memory_allocated)", "mps": "driver memory after training",
               "cpu": "peak RSS of the process so far (getrusage)"}


# ----------------------------------------------------------------------------- one device

def bench_training(model, step, images, masks, args, device, dtype, params):
    """Images per second of full training steps as kd.fit runs them (data, forward, backward,
    Adam), and the share of a step spent making its batch. Returns (img_s, data_pct, mem_mib)."""
    opt = torch.optim.Adam(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.train()

    def data():
        idx = torch.randperm(len(images), device=device)[:args.batch_size]
        return kd.batch(images, masks, idx, args.aug)

    def train_step():
        x, y = data()
        with kd.autocast(device, dtype):
            loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    reset_memory(device)
    t_step = median_time(train_step, device, args.warmup, args.repeats, args.steps)
    mem = peak_memory_mib(device)
    t_data = median_time(data, device, args.warmup, args.repeats, args.steps)
    return args.batch_size / t_step, 100 * t_data / t_step, mem


def bench_inference(model, images, args, device, dtype):
    """Milliseconds per frame at batch 1: plain fp32 eager (NCHW, BatchNorm as trained), the fast
    form (models.fast_model, what predict.py runs) and, with --compile, the fast form compiled.
    (test_kd.py checks that the fast form's masks are fp32's up to bf16 rounding.)"""
    x = normalize(images[:1].float() / 255)  # one phantom frame, as kd.batch makes it (no augmentation)
    plain = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    fast = fast_model(model, device, dtype)
    modes = [("fp32", plain, x), ("fast", fast, x.contiguous(memory_format=torch.channels_last))]
    if args.compile:
        modes.append(("compiled", torch.compile(fast), modes[1][2]))
    return {f"infer_ms_{name}": 1000 * median_time(lambda: lesion_probability(m, inp), device, args.warmup + 1,
                                                    args.repeats, 4 * args.steps)
            for name, m, inp in modes}


def profile_inference(model, images, device, dtype, calls=20, rows=12):
    """The PyTorch profiler's table of `calls` single-frame calls of the fast form: time per operator."""
    fast = fast_model(model, device, dtype)
    x = normalize(images[:1].float() / 255).contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # warm-up: kernel choice happens outside the profile
        lesion_probability(fast, x)
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            lesion_probability(fast, x)
        sync(device)
    key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(f"profile of {calls} fast single-frame calls on {device}, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def bench_device(device, args):
    """Every figure of both models on one device: a dict model -> metric -> value."""
    dtype = runs.amp_dtype(device, args.amp)
    data = make_phantom(args.batch_size, args.size, seed=0)  # one batch of phantom images, on the device
    images, masks = data.images.to(device), data.masks.to(device)
    runs.seed_everything(0)
    teacher = runs.to_device(UNet(args.teacher_width), device)
    student = runs.to_device(UNet(args.student_width), device)
    t_fwd, s_fwd = runs.maybe_compile(teacher, args.compile), runs.maybe_compile(student, args.compile)
    flops = {"teacher": conv_flops(teacher, args.size), "student": conv_flops(student, args.size)}

    def teacher_step(x, y):  # train_teacher.py's step
        return supervised_loss(t_fwd(x).float(), y)

    student_step, _ = distillation_step(student, s_fwd, t_fwd, METHODS["logits"], args, device, dtype)

    results = {}
    for who in ("student", "teacher"):  # the student first: on a CPU, memory is the process's peak so far
        model, step, step_flops = ((student, student_step, 3 * flops["student"] + flops["teacher"]) if who == "student"
                                   else (teacher, teacher_step, 3 * flops["teacher"]))
        if who == "student":
            teacher.eval().requires_grad_(False)  # frozen, as in train_student.py
        else:
            teacher.requires_grad_(True)
        img_s, data_pct, mem = bench_training(model, step, images, masks, args, device, dtype,
                                              list(model.parameters()))
        r = dict(params_m=count_parameters(model) / 1e6, fwd_gflop=flops[who] / 1e9, train_img_s=img_s,
                 train_tflops=img_s * step_flops / 1e12, data_pct=data_pct)
        peak = peak_tflops(device, args.peak_tflops)
        if peak:
            r["train_peak_pct"] = 100 * r["train_tflops"] / peak
        if mem is not None:
            r["train_mem_mib"] = mem
        r.update(bench_inference(model, images, args, device, dtype))
        results[who] = r
        if args.profile and who == "student":
            profile_inference(model, images, device, dtype)
        print(f"  {device.type} {who}: {img_s:.1f} training img/s, fast inference {r['infer_ms_fast']:.2f} ms", flush=True)
    if args.methods:
        teacher.eval().requires_grad_(False)
        for name, words in METHODS.items():
            step, params = distillation_step(student, s_fwd, t_fwd, words, args, device, dtype)
            img_s, _, _ = bench_training(student, step, images, masks, args, device, dtype, params)
            results["student"][f"step_ms_{name}"] = 1000 * args.batch_size / img_s
    return results, dtype


def distillation_step(student, s_fwd, teacher, words, args, device, dtype):
    """train_student.py's own training step (kd.make_step) for its command-line `words`,
    with the regressor or projector it would train; with --pathway joint, two class teachers (two
    copies of the teacher: the same cost), half the images routed to each. Returns (step(x, y) ->
    loss, the parameters the step trains)."""
    sargs = train_student.options().parse_args(words)
    if sargs.fast_teacher:
        teacher = fast_model(teacher, device, dtype)
    classes = None
    if sargs.pathway == "joint":
        teacher = ClassTeachers([teacher, copy.deepcopy(teacher)], ["benign", "malignant"]).eval()
        classes = torch.arange(args.batch_size, device=device) % 2
    regressor, projector = kd.extra_modules(sargs, student, teacher, device)
    extras = [m for m in (regressor, projector) if m is not None]
    step = kd.make_step(sargs, s_fwd, teacher, classes, regressor, projector)
    idx = torch.arange(args.batch_size, device=device)
    params = list(student.parameters()) + [p for m in extras for p in m.parameters()]
    return (lambda x, y: step(x, y, idx[:len(x)])["loss"]), params


# ----------------------------------------------------------------------------- main

def devices(spec):
    """--device: "all" or a comma-separated list -> torch devices this machine has."""
    if spec == "all":
        names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
                (["mps"] if torch.backends.mps.is_available() else [])
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--device {spec!r}: name a device, e.g. --device cpu")
    return [runs.pick_device(n) for n in names]


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None):
    """Run with command-line words `argv` (default: sys.argv); returns {device: {model: {metric: value}}}."""
    args = options().parse_args(argv)
    runs.check_at_least(args)
    for k in ("steps", "repeats"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} {getattr(args, k)}: must be at least 1")
    if args.warmup < int(args.compile):
        raise UserError(f"--warmup {args.warmup}: --compile needs at least 1, so compiling is not timed")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak_tflops {args.peak_tflops}: give the device's peak in TFLOP/s, e.g. 989")
    all_results, precisions = {}, {}
    for device in devices(args.device):
        print(f"benchmarking on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}, "
              f"{torch.get_num_threads()} CPU threads) at {args.size}x{args.size}, batch {args.batch_size} ...", flush=True)
        all_results[str(device)], precisions[str(device)] = bench_device(device, args)

    cols = [("params_m", "params M", ".2f"), ("fwd_gflop", "GFLOP/img", ".3g"), ("train_img_s", "train img/s", ".1f"),
            ("train_tflops", "TFLOP/s", ".3g"), ("train_peak_pct", "% peak", ".1f"), ("data_pct", "data %", ".1f"),
            ("infer_ms_fp32", "fp32 ms", ".2f"), ("infer_ms_fast", "fast ms", ".2f")]
    cols += [("infer_ms_compiled", "compiled ms", ".2f")] if args.compile else []
    cols += [("train_mem_mib", "train MiB", ".0f")]
    print(f"\n{'device':7s} {'model':8s} " + " ".join(f"{h:>{max(len(h), 8)}s}" for _, h, _ in cols))
    for dev, res in all_results.items():
        for who, r in res.items():
            print(f"{dev:7s} {who:8s} " + " ".join(f"{fmt(r.get(k), f):>{max(len(h), 8)}s}" for k, h, f in cols))
    print("\ntraining: images per second of whole steps (data + forward + backward + Adam), precision "
          + ", ".join(f"{d} {runs.precision_name(p)}" for d, p in precisions.items())
          + "; the student's step includes the frozen teacher's forward (logits KLD)")
    print("TFLOP/s: convolution FLOPs (2 x multiply-adds) of 3 forwards per step (+1 teacher forward when distilling)"
          + ("" if args.peak_tflops else "; % peak: dense bf16 peak of known GPUs, n/a elsewhere (give --peak_tflops)"))
    print("inference, batch 1, ms per frame: fp32 = plain fp32 eager, NCHW; fast = BatchNorm folded, "
          "channels_last, weights in the amp precision (predict.py)" + ("; compiled = fast + torch.compile" if args.compile else ""))
    print("data %: kd.batch (index + augment + normalise on the device) as a share of the whole step")
    print("train MiB: " + "; ".join(f"{d} {MEMORY_KIND[torch.device(d).type]}" for d in all_results))
    for dev, res in all_results.items():
        if "student" in res and "teacher" in res:
            s, t = res["student"], res["teacher"]
            s["infer_speedup_vs_teacher"] = t["infer_ms_fast"] / s["infer_ms_fast"]  # like for like
            s["infer_speedup_vs_teacher_fp32"] = t["infer_ms_fp32"] / s["infer_ms_fast"]
            s["infer_speedup_vs_fp32"] = s["infer_ms_fp32"] / s["infer_ms_fast"]
            print(f"{dev}: student fast inference {s['infer_ms_fast']:.2f} ms per frame: "
                  f"{s['infer_speedup_vs_teacher']:.1f}x the teacher's fast speed, "
                  f"{s['infer_speedup_vs_teacher_fp32']:.1f}x the teacher's plain fp32, "
                  f"{s['infer_speedup_vs_fp32']:.1f}x its own plain fp32")
    for dev, res in all_results.items():
        steps = {k[len("step_ms_"):]: v for k, v in res["student"].items() if k.startswith("step_ms_")}
        if steps:
            print(f"{dev}: the student's distillation step by method, ms per step of {args.batch_size} images "
                  f"(x the logits step): " + ", ".join(f"{k} {v:.0f} ({v / steps['logits']:.2f}x)" for k, v in steps.items()))
    print()
    for dev, res in all_results.items():
        for who, r in res.items():
            for k, v in r.items():
                if v is not None and math.isfinite(v):
                    print(f"RESULT model={who} device={dev} metric={k} value={v:.6g}")
    return all_results


if __name__ == "__main__":
    runs.exit_on_error(main)
