"""Our student alone on a public BUSI benchmark's split 1, at the benchmark's 256 px, with this
repository's defaults (Adam 1e-3, 3 warm-up epochs, cosine decay over 120 epochs, strong
augmentation, batch 16; the epoch of lowest validation loss kept, --select loss, the default when it
ran). Its 195 test names are the
benchmark's val list; our validation part is 15% of its 452 train names (--data_seed 0).

    python results/busi_benchmark/run.py --data data/Dataset_BUSI_with_GT [--seed 0]

Trains (or, when its checkpoint in --work is already there, only reads it) and writes the run's
record, per-image test Dice with the image names and no weights, to results/busi_benchmark/.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "results", "plateau"))
import probes  # noqa: E402  (its training call and record writer)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join("data", "Dataset_BUSI_with_GT"), help="the BUSI folder")
    p.add_argument("--work", default=os.path.join("out", "busi_benchmark"), help="checkpoint and run state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=10, help="10: the student, 0.76M parameters")
    a = p.parse_args()
    run = f"student_alone_w{a.width}_256px_split1_s{a.seed}"
    out = os.path.join(a.work, run + ".pt")
    argv = ["--data", a.data, "--split", os.path.relpath(os.path.join(ROOT, "results", "busi_benchmark_split_seed0.json")),
            "--folds", "3", "--fold", "0", "--size", "256", "--width", str(a.width), "--select", "loss", "--seed", str(a.seed), "--out", out]
    if not os.path.isfile(out) and probes.train(argv, out):
        sys.exit(f"error: {run}: train_teacher.py failed (see above)")
    ckpt = torch.load(out, weights_only=True)
    probes.write_record(os.path.join(HERE, run + ".json"), run, a.width, ckpt["args"]["epochs"], ckpt["args"]["lr"],
                        a.seed, argv, ckpt, with_test=True)
    t = ckpt["test"]
    print(f"{run}: test Dice {100 * t['dice']:.2f} over {len(t['names'])} images (validation {100 * ckpt['val']['dice']:.2f}, "
          f"best epoch {ckpt['epoch']}); record in {os.path.relpath(HERE, ROOT)}")
