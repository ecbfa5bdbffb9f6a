"""Tests: python -m pytest -q   (the BUSI tests run when BUSI_DIR names a Dataset_BUSI_with_GT folder)."""
import ast
import glob
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bench
import data
import kd
import losses
import runs
import predict
import study
import train_student
import train_teacher
from data import UserError
import models
from models import Ensemble, Pooled, Regressor, UNet, count_parameters

HERE = os.path.dirname(os.path.abspath(__file__))
BUSI_DIR = os.environ.get("BUSI_DIR", "")
needs_busi = pytest.mark.skipif(not os.path.isdir(os.path.join(BUSI_DIR, "benign")),
                                reason="set BUSI_DIR to a Dataset_BUSI_with_GT folder to run the BUSI tests")
# The devices the tests that train, evaluate, distil, resume, export or benchmark run on: the CPU
# always, CUDA and Apple's MPS where this machine has them (conftest.py names them in the summary).
DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
on_devices = pytest.mark.parametrize("device", DEVICES)
TINY = ["--data", "phantom", "--phantom_count", "24", "--size", "32", "--epochs", "2", "--batch_size", "4",
        "--folds", "2", "--device", "cpu"]


def script(name, *args, cwd=HERE):
    """Run a script as a user would: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, name), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def randomise_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def leaky_copy(path, out):
    """A copy of teacher checkpoint `path` at `out` whose stored split swaps one test image into training."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["split"]["test"][0], ckpt["split"]["train"][0] = ckpt["split"]["train"][0], ckpt["split"]["test"][0]
    torch.save(ckpt, out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    ckpt = train_teacher.main(TINY + ["--width", "4", "--out", out])
    return out, ckpt


# ----------------------------------------------------------------------------- losses

def brute_kl(p_logits, q_logits, T):
    """KL(P || Q) of two plain Python lists of logits, softened by T."""
    p = [math.exp(v / T) for v in p_logits]
    q = [math.exp(v / T) for v in q_logits]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_logits_losses_match_a_per_pixel_loop():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)  # 3 channels: a channel/pixel mix-up shows
    for T in (1.0, 2.5):
        want = np.mean([brute_kl(t[n, :, i, j].tolist(), s[n, :, i, j].tolist(), T)
                        for n in range(2) for i in range(4) for j in range(5)]) * T * T
        assert losses.logits_loss(s, t, "kld", T).item() == pytest.approx(want, rel=1e-5)
    want = np.mean([(s[n, c, i, j] - t[n, c, i, j]).item() ** 2
                    for n in range(2) for c in range(3) for i in range(4) for j in range(5)])
    assert losses.logits_loss(s, t, "mse").item() == pytest.approx(want, rel=1e-5)


def test_kld_temperature_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    soft = losses.kld(s, t, dim=1, T=4.0)
    plain = losses.kld(s / 4, t / 4, dim=1, T=1.0)  # the same distributions, without the T^2
    assert soft.item() == pytest.approx(16 * plain.item(), rel=1e-5)


def test_cwd_matches_a_loop_over_images_and_channels():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    for T in (1.0, 4.0):
        want = 0.0
        for n in range(2):
            for c in range(2):  # each class map is a distribution over its 12 pixels
                p, q = (torch.softmax(v[n, c].flatten() / T, 0) for v in (t, s))
                want += float((p * (p / q).log()).sum())
        assert losses.cwd(s, t, T) == pytest.approx(want / 4 * T * T, rel=1e-5)
        assert losses.logits_loss(s, t, "cwd", T) == losses.cwd(s, t, T)
    assert losses.cwd(t + 5.0, t) == pytest.approx(0.0, abs=1e-6)  # a constant shift of a map changes no distribution


def test_hidden_regressor_kld_is_over_channels_per_position():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 3, 2), torch.randn(2, 6, 3, 2)
    want = np.mean([brute_kl(t[n, :, i, j].tolist(), s[n, :, i, j].tolist(), 1.0)
                    for n in range(2) for i in range(3) for j in range(2)])
    assert losses.hidden_regressor_loss(s, t, "kld").item() == pytest.approx(want, rel=1e-5)
    assert losses.hidden_regressor_loss(s, t, "mse").item() == pytest.approx(((s - t) ** 2).mean().item())


def test_hidden_attention_loss_matches_a_loop():
    torch.manual_seed(3)
    fs, ft = torch.randn(2, 5, 3, 4), torch.randn(2, 9, 3, 4)  # different widths, as student vs teacher
    maps = []
    for f in (fs, ft):
        a = [[[sum(f[n, c, i, j].item() ** 2 for c in range(f.shape[1])) / f.shape[1] for j in range(4)]
              for i in range(3)] for n in range(2)]
        a = np.array(a)
        maps.append(a / np.sqrt((a ** 2).mean(axis=(1, 2), keepdims=True)))
    want_mse = ((maps[0] - maps[1]) ** 2).mean()
    want_kld = np.mean([brute_kl(maps[1][n].ravel().tolist(), maps[0][n].ravel().tolist(), 2.0) for n in range(2)]) * 4
    assert losses.hidden_loss(fs, ft, "mse").item() == pytest.approx(want_mse, rel=1e-4)
    assert losses.hidden_loss(fs, ft, "kld", T=2.0).item() == pytest.approx(want_kld, rel=1e-4)


@pytest.mark.parametrize("pathway", ["logits", "hidden", "hidden_regressor"])
@pytest.mark.parametrize("loss", ["mse", "kld"])
def test_distillation_zero_for_identical_positive_otherwise(pathway, loss):
    torch.manual_seed(4)
    logits, feats = torch.randn(2, 2, 8, 8), {"bottleneck": torch.rand(2, 6, 4, 4)}
    same = torch.nn.Identity()  # with identical widths, an identity "regressor" passes the features on
    assert losses.distillation_loss(pathway, loss, logits, feats, logits, feats, same).item() == pytest.approx(0, abs=1e-6)
    other_logits, other_feats = torch.randn(2, 2, 8, 8), {"bottleneck": torch.rand(2, 6, 4, 4)}
    assert losses.distillation_loss(pathway, loss, logits, feats, other_logits, other_feats, same).item() > 1e-4


def test_total_loss_and_supervised():
    assert losses.total_loss(torch.tensor(2.0), torch.tensor(4.0), 0.5).item() == 3.0
    assert losses.total_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == 3.5
    target = torch.tensor([[[[1, 0], [0, 0]]]])
    logits = torch.zeros(1, 2, 2, 2)
    assert losses.cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    perfect = torch.stack([1 - target[:, 0], target[:, 0]], 1).float() * 50
    assert losses.soft_dice_loss(perfect, target).item() == pytest.approx(0, abs=1e-6)


def test_no_gradient_reaches_the_teacher_and_the_regressor_learns():
    torch.manual_seed(5)
    teacher, student = UNet(4).eval().requires_grad_(False), UNet(2)
    reg = Regressor(student.feature_channels["bottleneck"], teacher.feature_channels["bottleneck"])
    before = [p.clone() for p in reg.parameters()]
    opt = torch.optim.Adam(list(student.parameters()) + list(reg.parameters()), lr=1e-2)
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 1, 32, 32))
    with torch.no_grad():
        t_logits, t_feats = teacher(x, return_features=True)
    s_logits, s_feats = student(x, return_features=True)
    l_kd = losses.distillation_loss("hidden_regressor", "mse", s_logits, s_feats, t_logits, t_feats, reg)
    losses.total_loss(l_kd, losses.supervised_loss(s_logits, y)).backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in reg.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, reg.parameters()))


# ----------------------------------------------------------------------------- T2KD and DCKD losses

def brute_ce(logits, n, i, j, c):
    """Cross-entropy of one pixel's logits against class c, from plain Python numbers."""
    v = [logits[n, k, i, j].item() for k in range(logits.shape[1])]
    return math.log(sum(math.exp(x) for x in v)) - v[c]


def test_weight_balance_loss_matches_a_per_pixel_loop():
    torch.manual_seed(10)
    logits = torch.randn(3, 2, 12, 12)
    target = torch.zeros(3, 1, 12, 12, dtype=torch.long)
    target[0, 0, 2:5, 3:7] = 1   # 12 of 144 pixels
    target[1, 0, 7, 7] = 1       # 1 of 144: f = 0.007 clamps to 0.01, so the normalisation matters
    target[2, 0, :, 2:] = 1      # 120 of 144
    want = []
    for n in range(3):
        f = min(max(target[n].sum().item() / 144, 0.01), 0.99)
        w = [[0.5 / f if target[n, 0, i, j] else 0.5 / (1 - f) for j in range(12)] for i in range(12)]
        mean_w = sum(map(sum, w)) / 144
        want.append(sum(w[i][j] / mean_w * brute_ce(logits, n, i, j, target[n, 0, i, j].item())
                        for i in range(12) for j in range(12)) / 144)
    assert losses.weight_balance_loss(logits, target).item() == pytest.approx(np.mean(want), rel=1e-5)
    assert losses.supervised_loss(logits, target, kind="wb").item() == pytest.approx(np.mean(want), rel=1e-5)
    assert losses.cross_entropy(logits, target).item() != pytest.approx(np.mean(want), rel=1e-3)


def test_weight_balance_small_and_large_lesions_weigh_the_same():
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, 0, 0] = 1  # a small lesion: 1 pixel of 16
    target[1, 0, :3] = 1    # a large one: 12 of 16
    w = losses.balance_weights(target)
    assert w.mean(dim=(1, 2)).tolist() == pytest.approx([1, 1])
    for n in range(2):
        lesion = target[n, 0].bool()
        assert w[n][lesion].sum().item() == pytest.approx(8) and w[n][~lesion].sum().item() == pytest.approx(8)
    # CE a on every lesion pixel and b on every background pixel: (a + b) / 2 per image, whatever the size
    logits = torch.stack([torch.zeros(2, 4, 4), torch.where(target[:, 0] == 1, 1.0, -3.0)], dim=1)
    a, b = math.log(1 + math.exp(-1)), math.log(1 + math.exp(-3))
    per_image = [losses.weight_balance_loss(logits[n:n + 1], target[n:n + 1]).item() for n in range(2)]
    assert per_image == pytest.approx([(a + b) / 2] * 2, rel=1e-5)
    assert losses.cross_entropy(logits[:1], target[:1]).item() == pytest.approx((a + 15 * b) / 16, rel=1e-5)


def test_weight_balance_is_plain_ce_at_half_and_supervised_loss_selects_it():
    torch.manual_seed(14)
    logits = torch.randn(2, 2, 4, 4)
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    target[1, 0, :, ::2] = 1  # both images f = 0.5
    ce = losses.cross_entropy(logits, target).item()
    assert losses.weight_balance_loss(logits, target).item() == pytest.approx(ce, rel=1e-6)
    assert losses.supervised_loss(logits, target).item() == ce  # default unchanged: the paper's CE
    target[1, 0, 0, 1] = 1  # f != 0.5: they part
    wb = losses.weight_balance_loss(logits, target)
    assert wb.item() != pytest.approx(losses.cross_entropy(logits, target).item(), rel=1e-4)
    dice = losses.soft_dice_loss(logits, target)
    assert losses.supervised_loss(logits, target, 0.5, kind="wb").item() == pytest.approx((wb + 0.5 * dice).item())
    with pytest.raises(ValueError):
        losses.supervised_loss(logits, target, kind="focal")


def test_decouple_mask_by_area_share():
    mask = torch.tensor([[[[1, 1, 1, 0],
                           [0, 0, 0, 0],
                           [1, 1, 0, 0],
                           [1, 0, 0, 0]]]])
    # 2x2 windows: top-left 2/4 = 0.5 (tumour), top-right 1/4, bottom-left 3/4 (tumour), bottom-right 0
    assert losses.decouple_mask(mask, (2, 2)).tolist() == [[[True, False], [True, False]]]
    assert losses.decouple_mask(mask, (1, 1)).tolist() == [[[False]]]  # 6/16 < 0.5
    assert losses.decouple_mask(mask, (4, 4)).tolist() == mask[:, 0].bool().tolist()


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_dckd_losses_match_a_loop_over_positions():
    torch.manual_seed(11)
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)  # 3 channels: a channel/pixel mix-up shows
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.long)
    mask[0, 0, :2, :4] = 1                      # image 0: tumour at feature positions (0, 0) and (0, 1)
    mask[1, 0, 2:, 4:], mask[1, 0, 0, 0] = 1, 1  # image 1: (1, 2); the lone pixel is 1/4 of (0, 0)
    tumour = {(0, 0, 0), (0, 0, 1), (1, 1, 2)}
    tau, hard, delta = 0.3, 2, 0.2
    l_con, l_rank = losses.dckd_loss(s, t, mask, torch.Generator().manual_seed(0), anchors=100, negatives=100,
                                     tau=tau, hard=hard, delta=delta)  # counts above the sizes: every position
    pos = [(n, y, x) for n in range(2) for y in range(2) for x in range(3)]
    S = {p: unit(s[p[0], :, p[1], p[2]].tolist()) for p in pos}
    T = {p: unit(t[p[0], :, p[1], p[2]].tolist()) for p in pos}
    con, rank = [], []
    for p in pos:
        negs = [T[q] for q in pos if (q in tumour) != (p in tumour)]
        e_pos = math.exp(dot(S[p], T[p]) / tau)
        con.append(-math.log(e_pos / (e_pos + sum(math.exp(dot(S[p], q) / tau) for q in negs))))
        nearest = sorted(1 - dot(S[p], q) for q in negs)[:hard]
        rank.append(sum(max(0.0, (1 - dot(S[p], T[p])) - d + delta) for d in nearest) / hard)
    assert l_con.item() == pytest.approx(np.mean(con), rel=1e-5)
    assert l_rank.item() == pytest.approx(np.mean(rank), rel=1e-5) and l_rank.item() > 0


def test_ranking_loss_uses_the_closest_negatives():
    s = t_pos = torch.tensor([[1.0, 0.0]])  # d(s, t_pos) = 0
    cosines = [0.9, 0.5, -1.0, 0.95]        # distances 0.1, 0.5, 2, 0.05
    t_neg = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])
    # the 2 closest (0.05, 0.1): (0.15 + 0.1) / 2; the 2 farthest would give 0
    assert losses.ranking_loss(s, t_pos, t_neg, hard=2, delta=0.2).item() == pytest.approx(0.125, rel=1e-5)
    assert losses.ranking_loss(s, t_pos, t_neg, hard=4, delta=0.2).item() == pytest.approx(0.0625, rel=1e-5)
    assert losses.ranking_loss(s, t_pos, t_neg, hard=9, delta=0.2).item() == pytest.approx(0.0625, rel=1e-5)


def test_contrastive_loss_temperature_follows_the_formula():
    s = torch.tensor([[1.0, 0.0]])
    t_pos, t_neg = torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, -0.8], [-1.0, 0.0]])  # cosines 0.8; 0.6, -1
    for tau in (0.1, 0.5, 2.0):
        want = -math.log(math.exp(0.8 / tau) / (math.exp(0.8 / tau) + math.exp(0.6 / tau) + math.exp(-1 / tau)))
        assert losses.contrastive_loss(s, t_pos, t_neg, tau).item() == pytest.approx(want, rel=1e-5)
    assert losses.contrastive_loss(s, t_pos, t_neg, 0.1).item() < losses.contrastive_loss(s, t_pos, t_neg, 0.5).item()


def test_dckd_is_none_without_both_classes_at_feature_scale():
    s, t = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 4, 4)
    assert losses.dckd_loss(s, t, mask, g) is None       # no tumour
    mask[0, 0, 0, 0] = 1
    assert losses.dckd_loss(s, t, mask, g) is None       # a tumour, but 1/4 of a position: none at this scale
    assert losses.dckd_loss(s, t, torch.ones(1, 1, 4, 4), g) is None  # no non-tumour
    mask[0, 0, 0, 1] = 1
    assert losses.dckd_loss(s, t, mask, g) is not None   # 2/4 of a position: a tumour position


def test_dckd_sampling_follows_the_generator_alone():
    torch.manual_seed(12)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    state = torch.get_rng_state()
    run = lambda seed: torch.stack(losses.dckd_loss(s, t, mask, torch.Generator().manual_seed(seed), anchors=3, negatives=5))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    region = losses.decouple_mask(mask, (8, 8))
    idx = losses.sample_anchors(region, 7, torch.Generator().manual_seed(0))
    assert idx.shape == (7, 3) and len(set(map(tuple, idx.tolist()))) == 7
    assert region[idx[:, 0], idx[:, 1], idx[:, 2]].all()
    few = torch.zeros(1, 3, 3, dtype=torch.bool)
    few[0, 1, 1] = few[0, 2, 0] = True
    assert sorted(map(tuple, losses.sample_anchors(few, 7, torch.Generator()).tolist())) == [(0, 1, 1), (0, 2, 0)]
    assert torch.equal(torch.get_rng_state(), state)


def test_dckd_gradients_reach_the_student_and_projector_not_the_teacher():
    from models import Projector
    torch.manual_seed(13)
    proj = Projector(3, 5)
    assert [type(m) for m in proj] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    s_raw = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)  # as if the teacher's graph had been kept
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :8] = 1
    s = proj(s_raw)
    assert s.shape == (2, 5, 4, 4)
    l_con, l_rank = losses.dckd_loss(s, t, mask, torch.Generator().manual_seed(0))
    (l_con + l_rank).backward()
    assert t.grad is None
    assert s_raw.grad is not None and s_raw.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


# ----------------------------------------------------------------------------- models

def test_unet_shapes_and_features():
    m = UNet(width=4)
    for size in (32, 37):  # 37: odd sizes pad up in the decoder and still give size x size out
        logits, f = m(torch.randn(2, 1, size, size), return_features=True)
        assert logits.shape == (2, 2, size, size)
        assert list(f) == ["enc1", "enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2", "dec1"]
        for name, c in m.feature_channels.items():
            assert f[name].shape[:2] == (2, c)
        assert f["bottleneck"].shape == (2, 64, size // 16, size // 16)
        assert f["dec1"].shape[-2:] == (size, size) and f["enc4"].shape[-2:] == f["dec4"].shape[-2:]


def test_parameter_counts_at_script_defaults():
    n_teacher = count_parameters(UNet(train_teacher.DEFAULTS["width"]))
    n_student = count_parameters(UNet(train_student.DEFAULTS["width"]))
    assert 30.5e6 < n_teacher < 31.5e6
    assert 0.7e6 < n_student < 1e6
    assert 90e6 < count_parameters(UNet(112)) < 100e6  # the paper's teacher scale


# ----------------------------------------------------------------------------- data: loaders, phantom, augmentation

def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)


def fake_busi(root, normal=True):
    """A small BUSI-like folder with the real quirks: extra _mask_1, RGBA and 1-bit masks, RGB
    images, an empty RGB normal mask and stray files."""
    rng = np.random.default_rng(0)
    img = lambda h=20, w=24: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    left, right = np.zeros((20, 24), np.uint8), np.zeros((20, 24), np.uint8)
    left[5:10, 2:8], right[12:18, 15:22] = 255, 255
    b = os.path.join(root, "benign")
    save_png(f"{b}/benign (1).png", img())
    save_png(f"{b}/benign (1)_mask.png", left, "1")
    save_png(f"{b}/benign (1)_mask_1.png", np.stack([right] * 3 + [np.full_like(right, 255)], -1))  # RGBA
    for i in (2, 10):
        save_png(f"{b}/benign ({i}).png", img())
        save_png(f"{b}/benign ({i})_mask.png", right, "1")
    save_png(f"{root}/malignant/malignant (1).png", img())
    save_png(f"{root}/malignant/malignant (1)_mask.png", left)
    if normal:
        save_png(f"{root}/normal/normal (1).png", img())
        save_png(f"{root}/normal/normal (1)_mask.png", np.zeros((20, 24, 3), np.uint8))
    for stray in (".DS_Store", "Thumbs.db", "._benign (1).png", "notes.txt"):
        with open(os.path.join(b, stray), "wb") as f:
            f.write(b"junk")
    return root, left, right


def test_busi_quirks(tmp_path):
    root, left, right = fake_busi(str(tmp_path))
    d = data.load_busi(root, size=24)
    assert d.names == ["benign/benign (1).png", "benign/benign (2).png", "benign/benign (10).png",
                       "malignant/malignant (1).png"]  # natural order, stray files ignored
    assert d.labels == ["benign"] * 3 + ["malignant"] and d.images.dtype == torch.uint8
    assert set(d.masks.unique().tolist()) == {0, 1}  # binarised, never 0/255
    union = np.asarray(Image.fromarray(((left | right) > 0).astype(np.uint8) * 255).resize((24, 24), Image.NEAREST)) // 255
    assert np.array_equal(d.masks[0, 0].numpy(), union)  # the union of both mask files
    assert len(data.load_busi(root, ("benign", "malignant", "normal"), 24)) == 5
    assert data.load_busi(root, ("normal",), 24).masks.sum() == 0
    assert data.load_data(root, size=24).source == "busi"


def test_generic_folder_loader(tmp_path):
    m = np.zeros((12, 12), np.uint8)
    m[2:5, 3:7] = 1  # a 0/1 mask file: binarised by half its maximum, so it still counts
    save_png(f"{tmp_path}/images/a.png", np.full((12, 12), 90, np.uint8))
    save_png(f"{tmp_path}/masks/a.png", m)
    save_png(f"{tmp_path}/images/b.jpg", np.full((12, 12), 90, np.uint8))
    save_png(f"{tmp_path}/masks/b_mask.png", np.zeros((12, 12), np.uint8))
    d = data.load_data(str(tmp_path), size=12)
    assert d.source == "folder" and d.names == ["a.png", "b.jpg"] and d.labels == ["lesion", "empty"]
    assert d.masks[0].sum() == m.sum()


def test_16_bit_files_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535: 8-bit value v is 257 v
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    mask = np.zeros((16, 16), np.uint16)
    mask[3:6, 4:9] = 1  # a 16-bit 0/1 mask
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")  # a mode convert("L") would clip at 255
    assert np.array_equal(np.asarray(data.open_image(tmp_path / "ramp.png", "L")), ramp // 257)
    assert np.array_equal(np.asarray(data.open_image(tmp_path / "mask.png", "L")), mask)


@pytest.mark.parametrize("case", ["no_mask", "size", "corrupt", "empty_class", "orphan_mask", "missing"])
def test_bad_data_gives_one_line_errors(tmp_path, case):
    root, _, _ = fake_busi(str(tmp_path / "busi"), normal=False)
    b = os.path.join(root, "benign")
    if case == "no_mask":
        os.remove(f"{b}/benign (2)_mask.png")
        words = ["benign (2).png", "has no mask"]
    elif case == "size":
        save_png(f"{b}/benign (2)_mask.png", np.zeros((7, 7), np.uint8))
        words = ["benign (2)_mask.png", "7x7", "24x20"]
    elif case == "corrupt":
        with open(f"{b}/benign (10).png", "wb") as f:
            f.write(b"\x89PNG not really")
        words = ["benign (10).png", "cannot read"]
    elif case == "empty_class":
        for f in os.listdir(f"{root}/malignant"):
            os.remove(f"{root}/malignant/{f}")
        words = ["malignant", "no images"]
    elif case == "orphan_mask":
        save_png(f"{b}/benign (7)_mask.png", np.zeros((20, 24), np.uint8))
        words = ["benign (7)_mask.png", "without an image"]
    else:
        root, words = str(tmp_path / "nowhere"), ["--data", "nowhere", "not found"]
    rc, out, err = script("train_teacher.py", "--data", root, "--size", "32", "--epochs", "1", cwd=str(tmp_path))
    assert_one_line_error(rc, err, *words)
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_fingerprint_sees_images_and_masks():
    a, b = data.make_phantom(6, 32, 0), data.make_phantom(6, 32, 0)
    assert a.fingerprint() == b.fingerprint()
    b.masks[2, 0, 5, 5] ^= 1  # one mask pixel re-annotated
    assert a.fingerprint() != b.fingerprint()
    c = data.make_phantom(6, 32, 0)
    c.hashes[0] = "0" * 40  # other image pixels
    assert a.fingerprint() != c.fingerprint()


def test_original_and_gt_folder_layout(tmp_path):
    """UDIAT's layout as it comes: original/ + GT/, here with other letter cases, formats and mask encodings."""
    (tmp_path / "Original").mkdir()
    (tmp_path / "gt").mkdir()
    lesion = np.zeros((20, 24), np.uint8)
    lesion[5:12, 6:15] = 1
    grey = (np.arange(20 * 24).reshape(20, 24) % 251).astype(np.uint8)
    save_png(tmp_path / "Original" / "000001.png", grey)
    Image.fromarray(grey).save(tmp_path / "Original" / "000002.bmp")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "Original" / "000003.jpg")
    save_png(tmp_path / "gt" / "000001.png", lesion * 255)                          # 0/255
    save_png(tmp_path / "gt" / "000002_GT.png", lesion)                             # 0/1
    Image.fromarray(np.stack([lesion * 255] * 3, -1)).save(tmp_path / "gt" / "000003_mask.png")  # RGB
    d = data.load_data(str(tmp_path), size=20)
    assert d.names == ["000001.png", "000002.bmp", "000003.jpg"] and d.source == "folder"
    want = np.asarray(Image.fromarray(lesion * 255).resize((20, 20), Image.NEAREST)) // 255
    assert all(np.array_equal(m[0].numpy(), want) for m in d.masks)
    (tmp_path / "gt" / "000002_GT.png").unlink()
    with pytest.raises(UserError, match="000002.bmp: no mask named 000002"):
        data.load_data(str(tmp_path), size=20)
    (tmp_path / "other" / "Original").mkdir(parents=True)
    (tmp_path / "other" / "labels").mkdir()  # a masks folder under a name of no layout
    with pytest.raises(UserError) as e:
        data.load_data(str(tmp_path / "other"))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in ("benign/", "images/ + masks/", "original/ + GT/"))
    with pytest.raises(UserError, match="original/ \\+ GT/"):
        data.load_folder(str(tmp_path / "other"))


def test_phantom_is_deterministic_binary_and_labelled():
    a, b = data.make_phantom(6, 48, seed=3), data.make_phantom(6, 48, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, data.make_phantom(6, 48, seed=4).images)
    assert set(a.masks.unique().tolist()) == {0, 1}
    assert all(m.sum() > 0 for m in a.masks)  # benign and malignant: every image holds a lesion
    n = data.make_phantom(4, 48, 0, ("benign", "normal"))
    assert n.labels == ["benign", "normal"] * 2 and n.masks[1].sum() == 0 and n.masks[0].sum() > 0
    assert a.images.dtype == torch.uint8 and a.images.shape == (6, 1, 48, 48) and a.masks.dtype == torch.uint8


def test_phantom_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data.make_phantom(2, 32, 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_phantom_lesions_spread_like_busi_and_reach_the_border():
    d = data.make_phantom(120, 64, 0)
    area = d.masks.float().mean(dim=(1, 2, 3))
    assert (area < 0.02).float().mean() >= 0.25 and (area > 0.10).float().mean() >= 0.1  # many small, some large
    assert (area < 0.01).any() and area.max() < 0.5  # from well under 1% of the image to about a third
    sides = d.masks[:, 0, :, 0].any(1) | d.masks[:, 0, :, -1].any(1)
    assert 0.05 < sides.float().mean() < 0.35  # some lesions leave the image at a side, most lie inside


def test_phantom_holds_dark_look_alikes_that_are_not_lesions():
    parts = list(data._phantom_images(60, 64, 0, ("benign", "malignant", "normal")))
    d = data.make_phantom(60, 64, 0, ("benign", "malignant", "normal"))
    for i, (cls, image, mask, dark) in enumerate(parts):  # the phantom's own images, one by one
        assert cls == d.labels[i] and np.array_equal(image, d.images[i, 0].numpy())
        assert torch.equal(mask, d.masks[i, 0].bool()) and not (dark & mask).any()  # never lesion
        if dark.any():  # darker than what lies beside them in the same rows
            img, rows = torch.from_numpy(image).float(), dark.any(1)
            assert img[dark].mean() < img[rows][~(dark | mask)[rows]].mean()
    for cls in ("benign", "normal"):
        share = np.mean([dark.any().item() for c, _, _, dark in parts if c == cls])
        assert 0.3 <= share < 1  # in many images of the class, not in every one


def test_phantom_posterior_effect_starts_at_the_lesions_lower_edge():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[10:20, 15:25] = True
    tissue = torch.ones(40, 40)
    shadow = data._posterior(tissue, mask, -0.5)
    assert torch.equal(shadow[:20], tissue[:20])            # nothing at or above the lesion's lower edge
    assert (shadow[20:26, 17:23] < 0.8).all() and (shadow[20:, 15:25] < 1).all()  # darker below it, in its columns
    assert torch.equal(shadow[:, :12], tissue[:, :12])       # and nowhere beside it
    assert shadow[21, 20] < shadow[39, 20]                   # fading with depth
    assert (data._posterior(tissue, mask, 0.3)[20:, 17:23] > 1.05).all()  # enhancement: brighter


def test_augmentation_moves_image_and_mask_together():
    torch.manual_seed(0)
    y = data.make_phantom(8, 48, 0).masks
    x = y.float()  # an image that *is* its mask: after the same warp they must still agree
    xa, ya = data.augment(x, y, "weak")  # weak: geometry only, no intensity changes
    assert torch.equal((xa > 0.5).float(), ya)
    assert not torch.equal(ya, y.float())  # it did move something
    xs, ys = data.augment(x, y, "strong")
    assert set(ys.unique().tolist()) <= {0.0, 1.0} and xs.min() >= 0 and xs.max() <= 1
    xn, yn = data.augment(x, y, "none")
    assert torch.equal(xn, x) and torch.equal(yn, y.float())
    z = data.normalize(torch.rand(3, 1, 16, 16))
    assert z.mean(dim=(1, 2, 3)).abs().max() < 1e-5 and (z.std(dim=(1, 2, 3)) - 1).abs().max() < 1e-4


def test_intensity_augmentation_survives_normalisation():
    """x * c + b is undone by per-image normalisation; strong augmentation's grey-level changes are not."""
    x = data.make_phantom(8, 48, 0).images.float() / 255
    affine = (x * 0.8 + 0.1).clamp(0, 1)
    assert (data.normalize(affine) - data.normalize(x)).abs().max() < 1e-3  # why a plain brightness/contrast is useless
    quiet = dict(data.AUGMENT["strong"], noise=0.0, dropout=0.0)
    change = lambda gamma, slope: (data.normalize(data.intensity(x, quiet, gamma, slope, torch.Generator()).clamp(0, 1))
                                   - data.normalize(x)).abs().mean(dim=(1, 2, 3))
    same = lambda v: torch.full((len(x),), v)
    assert (change(same(0.75), same(0.0)) > 0.02).all()  # every image, over all its pixels, not only where it clips
    assert change(same(1.0), same(0.3)).mean() > 0.02     # depth gain alone
    drawn = data.draw(len(x), "strong", torch.Generator().manual_seed(0))
    assert change(drawn["gamma"], drawn["slope"]).mean() > 0.05  # the strong defaults


def test_augmentation_draws_only_from_its_generator():
    y = data.make_phantom(4, 32, 0).masks
    x = y.float()
    state = torch.get_rng_state()
    a = data.augment(x, y, "strong", torch.Generator().manual_seed(3))
    b = data.augment(x, y, "strong", torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- splits

def test_splits_disjoint_deterministic_stratified_and_duplicate_safe():
    labels = ["benign"] * 60 + ["malignant"] * 30
    hashes = [f"h{i}" for i in range(90)]
    hashes[70] = hashes[5]    # one image under both classes, as BUSI's benign (433) / malignant (145)
    hashes[11] = hashes[12] = hashes[13]  # three copies of one image
    splits = data.make_splits(labels, hashes, folds=3, seed=7, val_fraction=0.2)
    assert splits == data.make_splits(labels, hashes, folds=3, seed=7, val_fraction=0.2)
    assert splits != data.make_splits(labels, hashes, folds=3, seed=8, val_fraction=0.2)
    tests = []
    for s in splits:
        parts = [set(s["train"]), set(s["val"]), set(s["test"])]
        assert sum(map(len, parts)) == 90 and len(set.union(*parts)) == 90  # disjoint, complete
        for group in ([5, 70], [11, 12, 13]):  # copies never straddle a boundary
            assert any(set(group) <= p for p in parts)
        n_mal = sum(labels[i] == "malignant" for i in s["test"])
        assert 9 <= n_mal <= 11 and 28 <= len(s["test"]) <= 32  # stratified: a third of each class
        assert 10 <= len(s["val"]) <= 14
        tests += s["test"]
    assert sorted(tests) == list(range(90))  # each image is tested exactly once over the folds


def brute_components(thumbnails, hashes, threshold):
    """Groups of near-copies by brute force: start from exact copies, then merge any two groups
    holding a pair that correlates above `threshold`, until none is left."""
    r = np.corrcoef(thumbnails.flatten(1).double().numpy())
    group = [hashes.index(h) for h in hashes]
    changed = True
    while changed:
        changed = False
        for i in range(len(group)):
            for j in range(len(group)):
                if r[i, j] > threshold and group[i] != group[j]:
                    old, new = max(group[i], group[j]), min(group[i], group[j])
                    group = [new if g == old else g for g in group]
                    changed = True
    return group


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_near_duplicate_groups_join_chains_of_correlated_thumbnails():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(6, 32, 32, generator=g) * 200
    n1, n2 = (16 * torch.randn(32, 32, generator=g) for _ in range(2))
    # 6: image 0 at another brightness and contrast (r = 1); 7: image 0 with noise (r about 0.96);
    # 8: image 7 with more noise (r about 0.96 with 7, about 0.93 with 0): a chain 0 - 7 - 8
    thumbs = torch.cat([t, torch.stack([0.5 * t[0] + 20, t[0] + n1, t[0] + n1 + n2])])
    hashes = [f"h{i}" for i in range(len(thumbs))]
    hashes[5] = hashes[4]  # an exact copy: one group at any threshold
    for threshold in (0, 0.9, 0.95, 0.99):
        got = data.near_duplicate_groups(thumbs, hashes, threshold)
        assert same_partition(got, brute_components(thumbs, hashes, threshold if threshold else 2))
    got = data.near_duplicate_groups(thumbs, hashes, 0.95)
    assert got[0] == got[6] == got[7] == got[8] and got[4] == got[5] and len(set(got)) == 5
    assert len(set(data.near_duplicate_groups(thumbs, hashes, 0.99))) == 7  # the chain breaks: 7 and 8 alone
    flat = data.near_duplicate_groups(torch.zeros(3, 32, 32), ["a", "b", "c"], 0.95)
    assert len(set(flat)) == 3  # a flat thumbnail correlates with nothing


def small_busi(root, n_benign=12, n_malignant=6):
    """A BUSI-like folder of random images, each with a lesion."""
    rng = np.random.default_rng(1)
    for cls, n in (("benign", n_benign), ("malignant", n_malignant)):
        for i in range(1, n + 1):
            save_png(f"{root}/{cls}/{cls} ({i}).png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
            mask = np.zeros((20, 24), np.uint8)
            mask[4:12, 5:15] = 255
            save_png(f"{root}/{cls}/{cls} ({i})_mask.png", mask)
    return data.load_busi(root, size=16)


def test_benchmark_name_lists_become_our_split(tmp_path):
    d = small_busi(str(tmp_path / "busi"))
    stems = [os.path.basename(n)[:-4] for n in d.names]
    lists = tmp_path / "lists"
    lists.mkdir()
    for k, test in ((1, stems[::3]), (2, stems[1::3])):  # the benchmark's val lists: our test parts
        (lists / f"busi_train{k}.txt").write_text("\n".join(s for s in stems if s not in test) + "\n")
        (lists / f"busi_val{k}.txt").write_text("\n".join(test) + "\n")
    splits = runs.load_splits(str(lists), d, 2, 0.25, seed=0)
    for k, s in enumerate(splits, 1):
        stems_of = lambda part: {stems[i] for i in part}
        assert stems_of(s["test"]) == set((lists / f"busi_val{k}.txt").read_text().splitlines())
        assert stems_of(s["train"] + s["val"]) == set((lists / f"busi_train{k}.txt").read_text().splitlines())
        for cls in ("benign", "malignant"):  # a quarter of each class of the benchmark's training list
            n_cls = sum(d.labels[i] == cls for i in s["train"] + s["val"])
            assert sum(d.labels[i] == cls for i in s["val"]) == round(0.25 * n_cls)
    assert splits == runs.load_splits(str(lists), d, 2, 0.25, seed=0)
    assert splits[0]["val"] != runs.load_splits(str(lists), d, 2, 0.25, seed=1)[0]["val"]
    pair = runs.load_splits(f"{lists / 'busi_train2.txt'},{lists / 'busi_val2.txt'}", d, 1, 0.25, seed=0)
    assert pair == splits[1:]
    (lists / "busi_val1.txt").write_text("benign (99)\n")
    with pytest.raises(UserError, match=r"busi_val1.txt: benign \(99\) is not an image of --data"):
        runs.load_splits(str(lists), d, 2)
    with pytest.raises(UserError, match="no busi_train1.txt"):
        runs.load_splits(str(tmp_path), d, 2)


# ----------------------------------------------------------------------------- the loop: Dice and evaluation

def test_dice_iou_on_hand_made_masks():
    m = lambda rows: torch.tensor(rows, dtype=torch.bool)[None, None]
    a = m([[1, 1, 0, 0]] * 2)
    cases = [(a, a, 1, 1),                         # perfect
             (a, m([[0, 0, 1, 1]] * 2), 0, 0),     # disjoint
             (a, m([[0, 1, 1, 0]] * 2), 0.5, 1 / 3),  # half overlap: 2*2/(4+4), 2/6
             (m([[0] * 4] * 2), m([[0] * 4] * 2), 1, 1),  # both empty: convention 1
             (a, m([[0] * 4] * 2), 0, 0)]          # lesion missed entirely
    for pred, target, dice, iou in cases:
        d, j = kd.dice_iou(pred, target)
        assert d.item() == pytest.approx(dice) and j.item() == pytest.approx(iou)
    d, j = kd.dice_iou(torch.cat([c[0] for c in cases]), torch.cat([c[1] for c in cases]))  # batched
    assert d.tolist() == pytest.approx([c[2] for c in cases]) and j.tolist() == pytest.approx([c[3] for c in cases])


@on_devices
def test_evaluate_keeps_every_image(device):
    d = data.make_phantom(7, 32, 0)
    r = kd.evaluate(UNet(2).to(device).eval(), d.images.to(device), d.masks.to(device), list(range(7)),
                    torch.device(device), None, batch_size=3)
    assert len(r["per_image_dice"]) == 7 and r["dice"] == pytest.approx(float(np.mean(r["per_image_dice"])))
    assert r["loss"] > 0


# ----------------------------------------------------------------------------- the loop: batches, schedule, fit, resume

def test_extra_modules_do_not_shift_the_data_stream(tiny_teacher, tmp_path, monkeypatch):
    """The student alone and an HR student (whose regressor draws initial weights) see the same batches."""
    seen = {}
    real = kd.batch

    def record(images, masks, idx, aug="none", generator=None, drawn=None):
        x, y = real(images, masks, idx, aug, generator, drawn)
        if generator is not None:  # a training batch
            seen.setdefault(run, []).append(x.clone())
        return x, y

    monkeypatch.setattr(kd, "batch", record)
    for run in ("none", "hidden_regressor"):
        train_student.main(["--teacher", tiny_teacher[0], "--pathway", run, "--width", "2", "--no-alone",
                            "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / f"{run}.pt")])
    assert len(seen["none"]) == len(seen["hidden_regressor"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen["none"], seen["hidden_regressor"]))


def test_a_teacher_at_twice_the_side_sees_the_students_batches_warped_alike(tiny_teacher, tmp_path, monkeypatch):
    """--student_size 16 under a 32-px teacher: the student's batches are the student alone's (the
    teacher's view draws only its own noise, from a generator of its own), and the teacher's view,
    averaged over 2x2 blocks, is the student's picture: the same flips, rotations, zooms, shifts."""
    seen = {}
    real = kd.batch

    def record(images, masks, idx, aug="none", generator=None, drawn=None):
        x, y = real(images, masks, idx, aug, generator, drawn)
        if generator is not None:  # a training batch: the student's, or (no masks) the teacher's view
            seen.setdefault((run, masks is None), []).append(x.clone())
        return x, y

    monkeypatch.setattr(kd, "batch", record)
    for run in ("none", "logits"):
        ckpt = train_student.main(["--teacher", tiny_teacher[0], "--pathway", run, "--student_size", "16", "--width",
                                   "2", "--no-alone", "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / f"{run}.pt")])
    alone, distilled, views = seen["none", False], seen["logits", False], seen["logits", True]
    assert ("none", True) not in seen and len(alone) == len(distilled) == len(views) == 3
    assert all(torch.equal(a, b) for a, b in zip(alone, distilled))
    assert distilled[0].shape[-1] == 16 and views[0].shape[-1] == 32
    corr = [np.corrcoef(F.avg_pool2d(v, 2).flatten().numpy(), x.flatten().numpy())[0, 1] for v, x in zip(views, distilled)]
    assert min(corr) > 0.8, corr  # views augmented apart correlate far less (random rotation, zoom, shift)
    assert ckpt["args"]["student_size"] == 16 and runs.image_size(ckpt) == 16 and ckpt["args"]["size"] == 32
    with pytest.raises(UserError, match="--student_size 24: must divide the teacher's --size 32"):
        train_student.main(["--teacher", tiny_teacher[0], "--student_size", "24", "--out", str(tmp_path / "x.pt")])


def test_pooled_teacher_answers_with_block_means_on_the_students_grid():
    class Echo(nn.Module):  # logits: the image and its negative; one feature map: twice the image
        feature_channels = dict(bottleneck=1)

        def forward(self, x, return_features=False):
            logits = torch.cat([x, -x], 1)
            return (logits, dict(bottleneck=2 * x)) if return_features else logits

    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) ** 1.5
    logits, feats = Pooled(Echo(), 3)(x, return_features=True)
    brute = torch.zeros(2, 1, 2, 2)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                brute[n, 0, i, j] = sum(x[n, 0, 3 * i + a, 3 * j + b] for a in range(3) for b in range(3)) / 9
    assert torch.allclose(logits, torch.cat([brute, -brute], 1)) and torch.allclose(feats["bottleneck"], 2 * brute)
    assert torch.allclose(Pooled(Echo(), 3)(x), logits) and Pooled(Echo(), 3).feature_channels == dict(bottleneck=1)


def test_batches_cover_every_index_once_and_never_leave_one_alone():
    idx = torch.arange(10) * 3
    chunks = kd.batches(idx, 3, torch.Generator().manual_seed(0))
    assert [len(c) for c in chunks] == [3, 3, 4]  # 3 + 3 + 3 + 1: the lone image joins the batch before it
    assert sorted(torch.cat(chunks).tolist()) == idx.tolist()
    assert [len(c) for c in kd.batches(idx, 4, torch.Generator())] == [4, 4, 2]
    assert [len(c) for c in kd.batches(idx[:1], 4, torch.Generator())] == [1]


def test_one_by_one_bottleneck_with_a_tail_of_one_image(tmp_path):
    """--size 16: the bottleneck is 1x1; 10 training images in batches of 3 would leave one alone."""
    ckpt = train_teacher.main(TINY[:4] + ["--size", "16", "--epochs", "1", "--batch_size", "3", "--folds", "2",
                                          "--device", "cpu", "--width", "2", "--out", str(tmp_path / "t.pt")])
    assert len(ckpt["split"]["train"]) % 3 == 1 and ckpt["epoch"] == 1


def test_early_stopping_keeps_the_epoch_of_lowest_validation_loss(monkeypatch, capsys):
    d = data.make_phantom(12, 32, 0)
    split = dict(train=list(range(8)), val=[8, 9], test=[10, 11])
    losses_by_epoch = iter([0.5, 0.3, 0.4, 0.35, 0.6, 0.1])
    real = kd.evaluate
    monkeypatch.setattr(kd, "evaluate", lambda *a, **k: dict(real(*a, **k), loss=next(losses_by_epoch)))
    used = []
    real_batch = kd.batch
    monkeypatch.setattr(kd, "batch", lambda im, m, idx, aug="none", generator=None, drawn=None:
                        (used.append(idx.tolist()) if generator is not None else None) or real_batch(im, m, idx, aug, generator, drawn))
    model = UNet(2)
    step = lambda x, y, idx: dict(loss=losses.supervised_loss(model(x).float(), y))
    run = kd.fit(model, d.images, d.masks, split, step, device=torch.device("cpu"), epochs=6, patience=2,
                 batch_size=4, aug="strong")
    assert run["best_epoch"] == 2 and run["stopped"] == "early stop" and run["best_val"]["loss"] == 0.3
    assert "epoch   4/6" in capsys.readouterr().out  # epochs 3 and 4 without improvement: stop after 4
    flat = [i for b in used for i in b]
    assert len(used) == 4 * 2 and sorted(set(flat)) == split["train"]  # training never indexes a val or test image


def test_clustered_interval_is_the_plain_one_for_single_images_and_widens_for_copies():
    rng = np.random.default_rng(0)
    d = rng.normal(1, 2, 30)
    plain = kd.paired_interval(d)
    assert kd.paired_interval(d, units=list(range(30))) == pytest.approx(plain)  # one image per group
    twice = kd.paired_interval(np.repeat(d, 2), units=np.repeat(np.arange(30), 2))  # each image seen twice
    assert twice == pytest.approx(plain)  # is the same evidence, not twice as much
    assert kd.paired_interval(np.repeat(d, 2))[2] < plain[2]  # counted as 60 images, the interval narrows


def test_lr_factor_worked_by_hand():
    assert kd.lr_factor(7, 10, 2, "constant") == 1.0
    cosine = [kd.lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0]  # warm-up over 2 steps, then the top of the cosine
    assert cosine[6] == pytest.approx(0.5)  # half-way down: (6 - 2) / (10 - 2)
    assert cosine[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))


def test_steps_per_epoch_counts_the_batches():
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 30):
        for bs in range(1, 9):
            assert kd.steps_per_epoch(n, bs) == len(kd.batches(torch.arange(n), bs, gen)), (n, bs)


def test_fit_follows_the_schedule_and_can_keep_the_best_dice(monkeypatch):
    d = data.make_phantom(12, 32, 0)
    split = dict(train=list(range(9)), val=[9, 10], test=[11])  # 9 images, batch 4: 2 steps per epoch
    dice_by_epoch = iter([0.2, 0.5, 0.4, 0.45])
    real = kd.evaluate
    monkeypatch.setattr(kd, "evaluate", lambda *a, **k: dict(real(*a, **k), dice=next(dice_by_epoch)))
    model = UNet(2)
    step = lambda x, y, idx: dict(loss=losses.supervised_loss(model(x).float(), y))
    run = kd.fit(model, d.images, d.masks, split, step, device=torch.device("cpu"), epochs=4, patience=9,
                 batch_size=4, lr=0.1, schedule="cosine", warmup=1, select="dice")
    assert run["best_epoch"] == 2 and run["best_val"]["dice"] == 0.5
    lrs = [h["lr"] for h in run["history"]]  # the rate after each epoch's last step
    assert lrs == pytest.approx([0.1 * kd.lr_factor(2 * e, 8, 2, "cosine") for e in (1, 2, 3, 4)])


def test_fit_can_keep_the_last_epoch_whatever_validation_says(monkeypatch):
    d = data.make_phantom(12, 32, 0)
    split = dict(train=list(range(9)), val=[9, 10], test=[11])
    losses_by_epoch = iter([0.1, 0.5, 0.9])  # validation only gets worse: "loss" would keep epoch 1
    real = kd.evaluate
    monkeypatch.setattr(kd, "evaluate", lambda *a, **k: dict(real(*a, **k), loss=next(losses_by_epoch)))
    model = UNet(2)
    step = lambda x, y, idx: dict(loss=losses.supervised_loss(model(x).float(), y))
    run = kd.fit(model, d.images, d.masks, split, step, device=torch.device("cpu"), epochs=3, patience=1,
                 batch_size=4, lr=0.1, select="last")
    assert run["best_epoch"] == 3 and run["best_val"]["loss"] == 0.9 and run["stopped"] == "last epoch"
    assert all(torch.equal(v, run["best_state"][k]) for k, v in model.state_dict().items())


def test_fit_averages_a_term_over_the_batches_that_have_it(capsys):
    d = data.make_phantom(12, 32, 0)
    split = dict(train=list(range(9)), val=[9, 10], test=[11])  # batch 4: batches of 4 and 5 images
    model = UNet(2)

    def step(x, y, idx):  # a term only some batches have, as DCKD's with no lesion position
        parts = dict(loss=losses.supervised_loss(model(x).float(), y))
        return dict(parts, extra=torch.tensor(3.0)) if len(idx) == 4 else parts

    kd.fit(model, d.images, d.masks, split, step, device=torch.device("cpu"), epochs=1, batch_size=4)
    assert "(extra 3.0000)" in capsys.readouterr().out  # not 3 * 4/9, its share of the images


def test_validation_loss_is_the_supervised_loss_that_trains():
    torch.manual_seed(0)
    d = data.make_phantom(6, 32, 0)
    model = UNet(2).eval()
    x, y = kd.batch(d.images, d.masks, torch.arange(6))
    with torch.no_grad():
        logits = model(x).float()
    for sup in ("ce", "wb"):
        r = kd.evaluate(model, d.images, d.masks, list(range(6)), torch.device("cpu"), None, 32, 0.0, sup)
        assert r["loss"] == pytest.approx(losses.supervised_loss(logits, y, 0.0, sup).item(), rel=1e-5)
    assert losses.weight_balance_loss(logits, y).item() != pytest.approx(losses.cross_entropy(logits, y).item(), rel=1e-3)


def test_every_form_of_teacher_distils_in_eval_mode(tiny_teacher, tmp_path, monkeypatch):
    seen, real = [], kd.make_step
    monkeypatch.setattr(kd, "make_step", lambda args, student, teacher, *a, **k:
                        seen.append(teacher) or real(args, student, teacher, *a, **k))
    words = ["--width", "2", "--epochs", "1", "--batch_size", "4", "--no-alone", "--out", str(tmp_path / "s.pt")]
    t = tiny_teacher[0]
    for more in (["--teacher", t], ["--teacher", t, "--student_size", "16"], ["--teacher", f"{t},{t}"]):
        train_student.main(words + more)
    assert len(seen) == 3 and [type(m).__name__ for m in seen] == ["UNet", "Pooled", "Ensemble"]
    assert not any(m.training for teacher in seen for m in teacher.modules())  # BatchNorm on its running statistics


def test_averaged_class_teachers_are_tested_as_the_one_teacher_they_are():
    d = data.make_phantom(8, 32, 0)
    split = dict(train=[0, 1], val=[2], test=[3, 4, 5, 6, 7])
    assert {d.labels[i] for i in split["test"]} == {"benign", "malignant"}
    cpu, args = torch.device("cpu"), types.SimpleNamespace(batch_size=4, dice_weight=0.0)
    members = [Constant(0.0, 6.0), Constant(4.0, 0.0)]  # the benign teacher: lesion everywhere; the malignant: nowhere
    everywhere, nowhere = (kd.evaluate(m, d.images, d.masks, split["test"], cpu, None, 4)["per_image_dice"]
                           for m in members)
    assert min(everywhere) > 0 and max(nowhere) == 0  # every test image has a lesion
    mean = models.ClassTeachers(members, ["benign", "malignant"], route="mean")  # logits (2, 3): lesion everywhere
    assert train_student.evaluate_teacher(mean, d, split, cpu, None, args)["per_image_dice"] == everywhere
    routed = train_student.evaluate_teacher(models.ClassTeachers(members, ["benign", "malignant"]), d, split, cpu,
                                            None, args)["per_image_dice"]
    assert routed == [(e if d.labels[i] == "benign" else n) for i, e, n in zip(split["test"], everywhere, nowhere)]
    assert routed != everywhere


def test_late_best_reads_the_lowest_validation_loss_not_the_kept_epoch():
    history = [dict(epoch=e, val_loss=v) for e, v in zip(range(1, 11), [9, 8, 7, 6, 5, 4, 3, 2, 1.5, 1.6])]
    rec = dict(epoch=10, history=history, argv=["--epochs", "10"])
    assert not study.late_best(rec)  # kept epoch 10 (--select last), lowest loss at 9: not in the last tenth
    history[-1]["val_loss"] = 1.0
    assert study.late_best(rec)
    assert study.late_best(dict(epoch=10, argv=["--epochs", "10"]))  # an old record: its kept epoch


def test_each_fold_and_seed_starts_from_weights_of_its_own(monkeypatch):
    seeds = {(f, s): runs.run_seed(s, f) for f in range(3) for s in range(3)}
    assert len(set(seeds.values())) == 9 and runs.run_seed(1, 2) == seeds[2, 1]
    starts = {}

    def stop(model, *a, **k):
        starts[model] = next(model.parameters()).detach().clone()
        raise SystemExit

    monkeypatch.setattr(kd, "fit", stop)
    for fold in ("0", "1"):
        with pytest.raises(SystemExit):
            train_teacher.main(TINY + ["--width", "2", "--fold", fold])
    a, b = starts.values()
    assert not torch.equal(a, b)


def test_no_gradient_reaches_train_students_teacher(tiny_teacher, tmp_path, monkeypatch):
    built = []
    real = runs.build_model
    monkeypatch.setattr(runs, "build_model", lambda ck: built.append(real(ck)) or built[-1])
    train_student.main(["--teacher", tiny_teacher[0], "--pathway", "hidden_regressor", "--width", "2", "--no-alone",
                        "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / "s.pt")])
    teacher = built[0]
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    saved = tiny_teacher[1]["model"]
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in teacher.state_dict().items())  # running stats too


def killed_after_epoch(monkeypatch, main, words, epoch):
    """Run main(words) as if the machine stopped right after the state of `epoch` was written."""
    real = runs.save_checkpoint

    def save_then_die(path, ckpt):
        real(path, ckpt)
        if ckpt.get("kind") == "state" and ckpt["run"]["epoch"] == epoch:
            raise SystemExit("killed")

    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        main(words)
    monkeypatch.setattr(runs, "save_checkpoint", real)


class EagerScaler(torch.amp.GradScaler):
    """A grad scaler that doubles its scale after every good step: here every other step overflows
    and is skipped, so which steps are skipped, and the weights, depend on the scaler's state."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._growth_interval = 1


def same_weights(a, b, device):
    """Equal weights; on a GPU, whose kernels are not deterministic, equal within 1e-3."""
    if device == "cpu":
        return all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


@on_devices
def test_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, device):
    words = TINY + ["--width", "2", "--epochs", "4", "--aug", "strong", "--schedule", "cosine", "--warmup", "1",
                    "--device", device]  # on a GPU the data stream's generator lives there too
    straight = train_teacher.main(words + ["--out", str(tmp_path / "a.pt")])
    out = str(tmp_path / "b.pt")
    killed_after_epoch(monkeypatch, train_teacher.main, words + ["--out", out], 2)
    assert not os.path.exists(out) and os.path.isfile(runs.state_path(out))
    resumed = train_teacher.main(words + ["--out", out, "--resume"])
    assert same_weights(resumed["model"], straight["model"], device) and resumed["epoch"] == straight["epoch"]
    if device == "cpu":
        assert resumed["test"]["per_image_dice"] == straight["test"]["per_image_dice"]
        assert resumed["val"]["loss"] == straight["val"]["loss"]
    assert not os.path.exists(runs.state_path(out))  # a finished run leaves no state behind


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # a skipped first step
@on_devices
def test_resume_keeps_the_grad_scalers_state(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.amp, "GradScaler", EagerScaler)
    words = TINY + ["--width", "2", "--epochs", "4", "--amp", "fp16", "--device", device]  # fp16: the scaler is on
    straight = train_teacher.main(words + ["--out", str(tmp_path / "a.pt")])
    out = str(tmp_path / "b.pt")
    killed_after_epoch(monkeypatch, train_teacher.main, words + ["--out", out], 1)  # after 3 steps: scale 2^17
    resumed = train_teacher.main(words + ["--out", out, "--resume"])
    assert same_weights(resumed["model"], straight["model"], device)
    # the same with the scaler's state dropped on resuming (its scale back at 2^16): the run goes another way
    monkeypatch.setattr(EagerScaler, "load_state_dict", lambda self, state: None)
    killed_after_epoch(monkeypatch, train_teacher.main, words + ["--out", out], 1)
    dropped = train_teacher.main(words + ["--out", out, "--resume"])
    assert not same_weights(dropped["model"], straight["model"], device)


def test_resume_of_a_dckd_student_ends_as_an_uninterrupted_run(tiny_teacher, tmp_path, monkeypatch, capsys):
    # DCKD draws its anchors from a generator of its own: the saved state must carry it too
    words = ["--teacher", tiny_teacher[0], "--pathway", "dckd", "--dckd_level", "dec3", "--anchors", "4",
             "--negatives", "4", "--hard", "2", "--width", "2", "--epochs", "3", "--batch_size", "4",
             "--no-alone", "--device", "cpu"]
    straight = train_student.main(words + ["--out", str(tmp_path / "a.pt")])
    out = str(tmp_path / "b.pt")
    killed_after_epoch(monkeypatch, train_student.main, words + ["--out", out], 1)
    capsys.readouterr()
    resumed = train_student.main(words + ["--out", out, "--resume"])
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])
    assert "random generators" not in capsys.readouterr().out
    # a state saved without the step's generators (as before they were saved) resumes, and says
    # that the run will not repeat an uninterrupted one
    killed_after_epoch(monkeypatch, train_student.main, words + ["--out", out], 1)
    state = torch.load(runs.state_path(out), weights_only=False)
    del state["generators"]
    torch.save(state, runs.state_path(out))
    capsys.readouterr()
    train_student.main(words + ["--out", out, "--resume"])
    assert "holds 0 of the step's 1 random generators" in capsys.readouterr().out


def test_resume_with_a_teacher_at_twice_the_side_ends_as_an_uninterrupted_run(tiny_teacher, tmp_path, monkeypatch):
    # the teacher's view draws its noise from a generator of its own: the saved state carries it
    words = ["--teacher", tiny_teacher[0], "--student_size", "16", "--width", "2", "--epochs", "3", "--batch_size", "4",
             "--no-alone", "--device", "cpu"]
    straight = train_student.main(words + ["--out", str(tmp_path / "a.pt")])
    out = str(tmp_path / "b.pt")
    killed_after_epoch(monkeypatch, train_student.main, words + ["--out", out], 1)
    resumed = train_student.main(words + ["--out", out, "--resume"])
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


def test_resume_refuses_other_options_and_a_missing_state(tmp_path, monkeypatch):
    out = str(tmp_path / "t.pt")
    killed_after_epoch(monkeypatch, train_teacher.main, TINY + ["--width", "2", "--out", out], 1)
    with pytest.raises(UserError, match=r"--resume: .*--lr 0.001 \(now 0.01\)"):  # 0.001: the phantom demo's
        train_teacher.main(TINY + ["--width", "2", "--out", out, "--resume", "--lr", "1e-2"])
    with pytest.raises(UserError, match="no unfinished run"):
        train_teacher.main(TINY + ["--width", "2", "--out", str(tmp_path / "other.pt"), "--resume"])
    state = torch.load(runs.state_path(out), weights_only=True)
    state["tag"]["device"] = "cuda"  # as if the run had started on a GPU
    torch.save(state, runs.state_path(out))
    with pytest.raises(UserError, match=r"--resume: .* ran on cuda, and would go on on cpu here.*--device cuda"):
        train_teacher.main(TINY + ["--width", "2", "--out", out, "--resume"])


def test_split_file_round_trip_and_refusal(tmp_path, capsys):
    path = str(tmp_path / "split.json")
    assert train_teacher.main(TINY + ["--save_split", path]) is None
    saved = json.load(open(path))
    d = data.make_phantom(24, 32, 0)
    made = data.make_splits(d.labels, d.hashes, 2, 0, 0.15)
    assert saved["folds"] == [{k: [d.names[i] for i in v] for k, v in s.items()} for s in made]
    assert saved["data_fingerprint"] == d.fingerprint() and saved["seed"] == 0
    assert runs.load_splits(path, d, 2) == made  # round trip: names back to the same indices
    moved = json.loads(json.dumps(saved))  # a hand-edited split: another assignment is honoured
    moved["folds"][0]["train"].append(moved["folds"][0]["test"].pop())
    json.dump(moved, open(path, "w"))
    ckpt = train_teacher.main(TINY + ["--width", "2", "--epochs", "1", "--split", path, "--out", str(tmp_path / "t.pt")])
    assert {k: sorted(v) for k, v in ckpt["split"].items()} == {k: sorted(v) for k, v in moved["folds"][0].items()}
    with pytest.raises(UserError, match="holds 2 folds"):
        runs.load_splits(path, d, 3)
    with pytest.raises(UserError, match="does not match --data"):
        runs.load_splits(path, data.make_phantom(20, 32, 0), 2)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a split file"):
        runs.load_splits(str(tmp_path / "bad.json"), d, 2)


def test_main_job_reports_the_gain_and_reuses_the_student_alone(tiny_teacher, tmp_path, capsys):
    words = ["--teacher", tiny_teacher[0], "--width", "2", "--epochs", "1", "--batch_size", "4"]
    s = train_student.main(words + ["--out", str(tmp_path / "kd.pt")])
    out = capsys.readouterr().out
    alone = runs.load_checkpoint(str(tmp_path / "student_alone.pt"), "student")
    assert alone["args"]["pathway"] == "none" and alone["split"] == s["split"]
    assert alone["model"].keys() == s["model"].keys()
    table = out[out.index("parameters  test Dice"):]
    for name, r in (("teacher", s["teacher_test"]), ("student alone", alone["test"]), ("distilled", s["test"])):
        assert re.search(rf"^{name}.*{100 * r['dice']:.2f}$", table, re.M), (name, table)
    gain = 100 * (s["test"]["dice"] - alone["test"]["dice"])
    assert f"distillation: {gain:+.2f} Dice over the student alone" in table
    before = runs.file_hash(str(tmp_path / "student_alone.pt"))
    train_student.main(words + ["--pathway", "hidden", "--out", str(tmp_path / "kd2.pt")])  # another pathway
    assert "reusing" in capsys.readouterr().out and runs.file_hash(str(tmp_path / "student_alone.pt")) == before
    train_student.main(words + ["--lr", "1e-2", "--out", str(tmp_path / "kd3.pt")])  # another schedule: retrained
    assert "training it again" in capsys.readouterr().out


def test_a_stopped_student_alone_goes_on_and_is_never_the_baseline_half_trained(tiny_teacher, tmp_path,
                                                                                  monkeypatch, capsys):
    words = ["--teacher", tiny_teacher[0], "--width", "2", "--epochs", "3", "--batch_size", "4"]
    straight = train_student.main(words + ["--pathway", "none", "--out", str(tmp_path / "straight" / "alone.pt")])
    calls, real = {"n": 0}, kd.augment

    def interrupted(*a, **k):  # Ctrl-C in epoch 2 of the student alone, the first of the two runs
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kd, "augment", interrupted)
    with pytest.raises(SystemExit) as e:
        train_student.main(words + ["--out", str(tmp_path / "kd.pt")])
    assert e.value.code == 130 and not os.path.exists(tmp_path / "kd.pt")  # stopped: no distilled run began
    alone_path = str(tmp_path / "student_alone.pt")
    assert runs.load_checkpoint(alone_path, "student")["stopped"] == "interrupted"
    monkeypatch.setattr(kd, "augment", real)
    with pytest.raises(UserError, match="no unfinished run .*a stopped student alone goes on by itself"):
        train_student.main(words + ["--out", str(tmp_path / "kd.pt"), "--resume"])  # refused before any training
    assert runs.load_checkpoint(alone_path, "student")["stopped"] == "interrupted"
    capsys.readouterr()
    train_student.main(words + ["--out", str(tmp_path / "kd.pt")])  # the same command again
    out = capsys.readouterr().out
    assert "going on with the stopped run" in out and "reusing" not in out
    alone = runs.load_checkpoint(alone_path, "student")
    assert alone["stopped"] == "last epoch" and alone["epoch"] == 3
    assert all(torch.equal(alone["model"][k], straight["model"][k]) for k in straight["model"])


def test_report_gives_the_gain_with_its_interval_and_a_share_only_of_a_clear_lead(capsys):
    alone = [0.5, 0.6, 0.7, 0.8]
    distilled = [0.52, 0.61, 0.73, 0.82]  # gains 2, 1, 3, 2 points: mean 2, sd sqrt(2/3)
    student = lambda dice: dict(parameters=10, test=dict(dice=sum(dice) / 4, per_image_dice=dice))
    half = kd.t_quantile(0.975, 3) * math.sqrt(2 / 3) / 2
    teacher = dict(dice=0.7, per_image_dice=[0.6, 0.7, 0.8, 0.9])  # leads by 10 points on every image
    train_student.report(teacher, 100, [("student alone", student(alone)), ("distilled", student(distilled))])
    out = capsys.readouterr().out
    assert f"distillation: +2.00 Dice over the student alone, 95% interval [{2 - half:+.2f}, {2 + half:+.2f}] " \
           "over 4 test images: above 0 (conditional on these two trained models and this split)" in out
    assert "the teacher's lead over the student alone: +10.00 [+10.00, +10.00]; distillation recovered 20% of it" in out
    assert "the student has 10.0x fewer parameters than the teacher" in out
    noisy = dict(dice=0.65, per_image_dice=[0.3, 0.9, 0.5, 0.9])  # leads by -20, +30, -20, +10: not clear
    train_student.report(noisy, 5, [("student alone", student(alone)), ("distilled", student(alone[::-1]))])
    out = capsys.readouterr().out
    assert "over 4 test images: too close to call" in out and "not clearly above 0, so no share of it is given" in out
    assert "recovered" not in out and "the student has 2.0x the teacher's parameters" in out
    # images 0 and 1 near-copies: the mean over images stays, its standard error is clustered over 3 groups:
    # gains 2, 1 | 3 | 2 about their mean 2 sum to -1, +1, 0 per group; se = sqrt(3/2 * 2) / 4, t with 2 df
    uneven = dict(dice=0.7, per_image_dice=[0.6, 0.8, 0.8, 0.9])  # leads 10, 20 | 10 | 10: sums 5, -2.5, -2.5
    train_student.report(uneven, 100, [("student alone", student(alone)), ("distilled", student(distilled))],
                         units=[7, 7, 3, 5])
    out = capsys.readouterr().out
    half = kd.t_quantile(0.975, 2) * math.sqrt(3 / 2 * 2) / 4
    assert f"distillation: +2.00 Dice over the student alone, 95% interval [{2 - half:+.2f}, {2 + half:+.2f}] " \
           "over 4 test images in 3 groups of near-copies: above 0" in out
    half = kd.t_quantile(0.975, 2) * math.sqrt(3 / 2 * (5 ** 2 + 2 * 2.5 ** 2)) / 4
    assert f"lead over the student alone: +12.50 [{12.5 - half:+.2f}, {12.5 + half:+.2f}]" in out


def test_class_teacher_trains_on_its_class_of_the_whole_split(tiny_teacher, tmp_path):
    path, whole = tiny_teacher
    ckpt = train_teacher.main(TINY + ["--width", "4", "--only_class", "malignant", "--out", str(tmp_path / "m.pt")])
    assert ckpt["split"] == whole["split"]  # the split is the one made from every class
    assert ckpt["test"]["names"] and all("malignant" in n for n in ckpt["test"]["names"])
    assert set(ckpt["test"]["names"]) == {n for n in whole["split"]["test"] if "malignant" in n}
    with pytest.raises(UserError, match="--only_class normal"):
        train_teacher.main(TINY + ["--only_class", "normal", "--out", str(tmp_path / "n.pt")])
    with pytest.raises(UserError, match="class teacher"):
        train_student.main(["--teacher", str(tmp_path / "m.pt"), "--out", str(tmp_path / "s.pt")])


def test_amp_auto_takes_bf16_only_where_native(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))  # V100, T4
    assert runs.amp_dtype(cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # A100, H100
    assert runs.amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(runs, "cpu_has_native_bf16", lambda: False)
    assert runs.amp_dtype(cpu) is None and runs.amp_dtype(cpu, "bf16") == torch.bfloat16 and runs.amp_dtype(cuda, "off") is None
    monkeypatch.setattr(runs, "cpu_has_native_bf16", lambda: True)
    assert runs.amp_dtype(cpu) == torch.bfloat16
    assert runs.amp_dtype(torch.device("mps")) is None


def test_cpu_bf16_check_reads_the_flags(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, native in (("fpu avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else p, *a, **k))
        assert runs.cpu_has_native_bf16() is native, flags


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "r.json")
    runs.write_json(path, {"a": 1})
    with pytest.raises(UserError, match=r"r.json: writing it failed with \d+ MiB free .*\(disk full\)"):
        runs.atomic_write(path, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("disk full"))))
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write: no half file either
        runs.atomic_write(path, lambda f: (f.write(b"half"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    names = []
    real = runs.tempfile.mkstemp
    runs.tempfile.mkstemp = lambda **k: names.append(real(**k)) or names[-1]
    try:
        runs.write_json(path, {"a": 2})
        runs.save_checkpoint(str(tmp_path / "c.pt"), {"b": 3})
        runs.write_json(path, {"a": 3})
    finally:
        runs.tempfile.mkstemp = real
    assert len({n for _, n in names}) == 3 and all(os.path.dirname(n) == str(tmp_path) for _, n in names)
    assert json.load(open(path)) == {"a": 3} and sorted(os.listdir(tmp_path)) == ["c.pt", "r.json"]


def test_full_disk_is_one_line_and_keeps_every_finished_file(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "t.pt")
    train_teacher.main(TINY + ["--width", "2", "--epochs", "1", "--out", out])  # an older, finished run
    before = runs.file_hash(out)
    real = torch.save

    def disk_full_at_epoch_2(obj, f, *a, **k):  # as torch.save fails when the disk fills up
        if isinstance(obj, dict) and obj.get("kind") == "state" and obj["run"]["epoch"] == 2:
            f.write(b"part of a state")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_epoch_2)
    with pytest.raises(SystemExit) as e:
        runs.exit_on_error(lambda: train_teacher.main(TINY + ["--width", "2", "--epochs", "3", "--out", out]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {runs.state_path(out)}: writing it failed with "), err
    assert "MiB free" in err[0] and "--resume" in err[0]
    assert runs.file_hash(out) == before  # the finished checkpoint, untouched
    assert torch.load(runs.state_path(out), weights_only=True)["run"]["epoch"] == 1  # the last good state
    assert sorted(os.listdir(tmp_path)) == ["t.pt", "t.run.pt"]  # no temporary file left


@pytest.mark.parametrize("dice", [0.0, 0.25])
def test_a_model_that_finds_no_lesion_gets_a_note(tmp_path, monkeypatch, capsys, dice):
    real = kd.evaluate

    def evaluate(*a, **k):  # every validation Dice forced to `dice`, as a stalled narrow U-Net scores
        return dict(real(*a, **k), dice=dice)

    monkeypatch.setattr(kd, "evaluate", evaluate)
    out = str(tmp_path / "t.pt")
    ckpt = train_teacher.main(TINY + ["--width", "2", "--epochs", "1", "--out", out])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert ckpt["val"]["dice"] == dice and os.path.isfile(out)
    assert notes == ([f"note: {out} scores Dice 0 on every validation image: it has not yet left the answer 'no lesion "
                      f"anywhere', where narrow U-Nets can stay for tens of epochs; train longer (--epochs) or try "
                      f"another --seed"] if dice == 0 else [])


PROJECT_MODULES = {"data", "losses", "models", "kd"}


def copied_out(*objects):
    """The source of `objects` and of every name they use, as one file: what a reader pastes into
    coursework. Project functions, classes and constants are copied (what they use first); other
    modules and names become import lines."""
    imports, parts, done = [], [], set()

    def visit(obj, module):
        key = (module.__name__, obj.__name__)
        if key in done:
            return
        done.add(key)
        src = textwrap.dedent(inspect.getsource(obj))
        for name in sorted({n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}):
            used = module.__dict__.get(name)
            if used is None or name == obj.__name__:
                continue
            if inspect.ismodule(used):
                imports.append(f"import {used.__name__}" + (f" as {name}" if name != used.__name__ else ""))
            elif getattr(used, "__module__", None) in PROJECT_MODULES and (inspect.isfunction(used) or inspect.isclass(used)):
                visit(used, sys.modules[used.__module__])
            elif getattr(used, "__module__", None) not in (None, module.__name__) and hasattr(used, "__name__"):
                imports.append(f"from {used.__module__} import {used.__name__} as {name}")
            else:  # a constant of the module: its assignment
                tree = ast.parse(inspect.getsource(module))
                parts.append(next(ast.get_source_segment(inspect.getsource(module), n) for n in tree.body
                                  if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets)))
        parts.append(src)

    for obj in objects:
        visit(obj, sys.modules[obj.__module__])
    return "\n".join(sorted(set(imports))) + "\n\n\n" + "\n\n".join(dict.fromkeys(parts))


def test_kld_unet_and_fit_run_when_copied_out(tmp_path):
    code = copied_out(losses.kld, models.UNet, kd.fit) + textwrap.dedent('''
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 255, (12, 1, 32, 32), dtype=torch.uint8, generator=g)
        masks = (torch.rand(12, 1, 32, 32, generator=g) > 0.7).to(torch.uint8)
        student, teacher = UNet(2), UNet(4).eval()
        step = lambda x, y, idx: dict(loss=kld(student(x).float(), teacher(x).float().detach(), dim=1, T=2.0))
        run = fit(student, images, masks, dict(train=list(range(8)), val=[8, 9], test=[10, 11]), step,
                  device=torch.device("cpu"), epochs=1, batch_size=4, lr=1e-3, schedule="cosine", warmup=1)
        print("trained", run["epoch"], run["best_epoch"])
    ''')
    (tmp_path / "coursework.py").write_text(code)
    assert "import kd" not in code and "import runs" not in code and "from kd" not in code
    p = subprocess.run([sys.executable, "coursework.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trained 1 1" in p.stdout


# ----------------------------------------------------------------------------- the scripts: checkpoints, one-line errors, faults

def test_checkpoint_round_trip_rebuilds_the_model(tiny_teacher):
    path, ckpt = tiny_teacher
    loaded = runs.load_checkpoint(path, "teacher")
    model = runs.build_model(loaded)
    again = runs.build_model(loaded)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        ref = UNet(**ckpt["model_config"]).eval()
        ref.load_state_dict(ckpt["model"])
        assert torch.equal(model(x), ref(x))
    assert loaded["args"]["width"] == 4 and loaded["split"]["test"] and loaded["test"]["names"] == loaded["split"]["test"]
    assert len(loaded["test"]["per_image_dice"]) == len(loaded["split"]["test"])


def test_same_seed_same_metrics_on_cpu(tiny_teacher, tmp_path):
    _, ckpt = tiny_teacher
    again = train_teacher.main(TINY + ["--width", "4", "--out", str(tmp_path / "t.pt")])
    assert again["test"]["per_image_dice"] == ckpt["test"]["per_image_dice"]
    assert again["val"]["loss"] == ckpt["val"]["loss"]


@on_devices
def test_training_lowers_the_loss(device):
    torch.manual_seed(0)
    d = data.make_phantom(16, 32, 0)
    model = UNet(4).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = kd.batch(d.images.to(device), d.masks.to(device), torch.arange(16, device=device))
    first = None
    for _ in range(15):
        loss = losses.supervised_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("pathway,loss,extra", [("logits", "kld", []), ("logits", "cwd", []), ("hidden", "mse", []),
                                               ("hidden_regressor", "kld", []), ("none", "kld", []),
                                               ("hidden", "kld", ["--teacher_flip"]),
                                               ("hidden_regressor", "mse", ["--fast_teacher"])])
@on_devices
def test_student_runs_on_its_teachers_split(tiny_teacher, tmp_path, pathway, loss, extra, device):
    path, t = tiny_teacher
    s = train_student.main(["--teacher", path, "--pathway", pathway, "--loss", loss, "--width", "2", "--no-alone",
                            "--epochs", "1", "--batch_size", "4", "--device", device, "--out", str(tmp_path / "s.pt")]
                           + extra)
    assert s["split"] == t["split"] and s["kind"] == "student"
    saved = runs.load_checkpoint(str(tmp_path / "s.pt"), "student")["model"]
    assert sorted(saved) == sorted(UNet(2).state_dict())  # exactly a student: no regressor weights saved with it
    assert s["parameters"] == count_parameters(UNet(2)) and s["teacher_parameters"] == t["parameters"]
    if not extra:  # the plain teacher is what is reported as the teacher
        assert s["teacher_test"]["per_image_dice"] == pytest.approx(t["test"]["per_image_dice"], abs=0 if device == "cpu" else 0.05)
    assert not os.path.exists(tmp_path / "student_alone.pt") and not os.path.exists(tmp_path / "s.run.pt")


def test_cwd_is_for_the_logits_only(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="--loss cwd: .* use it with --pathway logits"):
        train_student.main(["--teacher", tiny_teacher[0], "--pathway", "hidden", "--loss", "cwd",
                            "--out", str(tmp_path / "s.pt")])


def test_student_refuses_another_split(tiny_teacher, tmp_path):
    path, _ = tiny_teacher
    rc, _, err = script("train_student.py", "--teacher", leaky_copy(path, tmp_path / "leaky.pt"), cwd=str(tmp_path))
    assert_one_line_error(rc, err, "leaky.pt", "split differs")
    rc, _, err = script("train_student.py", "--teacher", path, "--fold", "1", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--fold 1", "trained with --fold 0")
    assert not os.path.exists(tmp_path / "out")


def test_student_refuses_files_that_are_no_teacher(tiny_teacher, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    student = tmp_path / "student.pt"
    train_student.main(["--teacher", tiny_teacher[0], "--width", "2", "--epochs", "1", "--out", str(student)])
    for f, words in (("junk.pt", "not a readable"), ("other.pt", "not a checkpoint of this project"),
                     ("student.pt", "a student checkpoint, not a teacher"), ("missing.pt", "file not found")):
        rc, _, err = script("train_student.py", "--teacher", str(tmp_path / f), cwd=str(tmp_path))
        assert_one_line_error(rc, err, f, words)


def test_ensemble_is_the_mean_of_its_members_logits():
    torch.manual_seed(0)
    members = [randomise_batchnorm(UNet(4).eval(), seed) for seed in (1, 2, 3)]
    ens = Ensemble(members)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = sum(m(x) for m in members) / 3
        logits, feats = ens(x, return_features=True)
    assert torch.allclose(logits, expected, atol=1e-6) and feats == {}
    assert not torch.allclose(logits, members[0](x).detach(), atol=1e-3)  # the members really differ
    assert count_parameters(ens) == 3 * count_parameters(UNet(4))


def test_student_distils_an_ensemble_of_teachers(tiny_teacher, tmp_path):
    path, t = tiny_teacher
    other = str(tmp_path / "teacher_seed1.pt")
    t1 = train_teacher.main(TINY + ["--width", "4", "--seed", "1", "--out", other])
    s = train_student.main(["--teacher", f"{path},{other}", "--width", "2", "--epochs", "1", "--batch_size", "4",
                            "--no-alone", "--out", str(tmp_path / "s.pt")])
    assert s["teacher_parameters"] == t["parameters"] + t1["parameters"] and s["split"] == t["split"]
    ens_loss = s["teacher_test"]["loss"]  # the ensemble is what is evaluated as the teacher, not one member
    assert ens_loss != pytest.approx(t["test"]["loss"]) and ens_loss != pytest.approx(t1["test"]["loss"])
    rc, _, err = script("train_student.py", "--teacher", f"{path},{other}", "--pathway", "hidden_regressor",
                        cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--pathway hidden_regressor", "ensemble", "--pathway logits")
    rc, _, err = script("train_student.py", "--teacher", f"{path},{leaky_copy(other, tmp_path / 'leaky.pt')}",
                        cwd=str(tmp_path))
    assert_one_line_error(rc, err, "leaky.pt", "split differs")


def test_nan_loss_stops_keeps_the_state_and_the_older_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "t.pt")
    finished = train_teacher.main(TINY + ["--width", "2", "--epochs", "1", "--out", out])  # an older, finished run
    before = runs.file_hash(out)
    calls = {"n": 0}
    real = train_teacher.supervised_loss

    def flaky(*a, **k):  # fine through epoch 1 (3 steps of 4 images), NaN afterwards
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train_teacher, "supervised_loss", flaky)
    with pytest.raises(SystemExit) as e:
        runs.exit_on_error(lambda: train_teacher.main(TINY + ["--width", "2", "--epochs", "5", "--out", out]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training loss became nan at epoch 2") and "state after epoch 1" in err
    assert len(err.splitlines()) == 1
    assert runs.file_hash(out) == before and runs.load_checkpoint(out, "teacher")["test"] == finished["test"]
    state = torch.load(runs.state_path(out), weights_only=True)  # the last good epoch, for --resume
    assert state["run"]["epoch"] == 1 and state["run"]["best_epoch"] == 1


def test_nan_validation_loss_from_epoch_one_is_one_line(tmp_path, monkeypatch, capsys):
    real = kd.evaluate
    monkeypatch.setattr(kd, "evaluate", lambda *a, **k: dict(real(*a, **k), loss=float("nan")))
    out = tmp_path / "t.pt"
    with pytest.raises(SystemExit) as e:
        runs.exit_on_error(lambda: train_teacher.main(TINY + ["--width", "2", "--out", str(out)]))
    assert e.value.code == 1  # as for a run that diverged
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validation loss became nan at epoch 1"), err
    assert "nothing was saved" in err[0] and not out.exists()


def test_ctrl_c_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = kd.augment

    def interrupted(*a, **k):  # Ctrl-C in the middle of epoch 2
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kd, "augment", interrupted)
    out = str(tmp_path / "t.pt")
    ckpt = train_teacher.main(TINY + ["--width", "2", "--epochs", "5", "--out", out])
    assert ckpt["epoch"] == 1 and ckpt["stopped"] == "interrupted"
    assert runs.load_checkpoint(out, "teacher")["test"]["dice"] == ckpt["test"]["dice"]
    assert os.path.isfile(runs.state_path(out))  # kept: --resume can go on with the run


def test_bad_options_and_help(tiny_teacher, tmp_path):
    rc, out, err = script("train_teacher.py", "--help")
    assert rc == 0 and err == "" and "(default: strong)" in out and "usage: train_teacher.py" in out
    rc, _, err = script("train_teacher.py", "--data", "phantom", "--folds", "3", "--fold", "3", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--fold 3")
    rc, _, err = script("train_teacher.py", "--data", "phantom", "--out", "model.bin", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--out model.bin")
    for name, args, words in (("train_teacher.py", ["--data", "phantom", "--size", "8"], ["--size 8", "at least 16"]),
                              ("train_teacher.py", ["--data", "phantom", "--phantom_count", "4", "--folds", "3"],
                               ["too few", "--folds"]),
                              ("train_student.py", ["--teacher", tiny_teacher[0], "--alpha", "2"], ["--alpha 2.0"]),
                              ("train_teacher.py", ["--data", "phantom", "--seed", "-1"], ["--seed -1", "0 or more"])):
        rc, _, err = script(name, *args, cwd=str(tmp_path))
        assert_one_line_error(rc, err, *words)


# ----------------------------------------------------------------------------- the scripts: T2KD and DCKD in the student

class Constant(nn.Module):
    """A fake teacher whose logits and bottleneck are one constant, so routing can be read off; with
    `lesion`, its lesion logit is that other constant."""
    feature_channels = {"bottleneck": 3}

    def __init__(self, value, lesion=None):
        super().__init__()
        self.value, self.lesion = value, value if lesion is None else lesion

    def forward(self, x, return_features=False):
        n, _, h, w = x.shape
        logits = torch.tensor([self.value, self.lesion]).view(1, 2, 1, 1).repeat(n, 1, h, w)
        return (logits, {"bottleneck": torch.full((n, 3, h // 16 or 1, w // 16 or 1), self.value)}) if return_features else logits


def test_class_teachers_route_each_image_to_its_class():
    teachers = models.ClassTeachers([Constant(1.0), Constant(2.0)], ["benign", "malignant"])
    index = torch.tensor([1, 0, 0, 1, 1])
    logits, feats = teachers(torch.zeros(5, 1, 32, 32), index, return_features=True)
    for i, c in enumerate(index.tolist()):
        assert (logits[i] == c + 1.0).all() and (feats["bottleneck"][i] == c + 1.0).all()
    mean = models.ClassTeachers([Constant(1.0), Constant(2.0)], ["benign", "malignant"], route="mean")
    assert (mean(torch.zeros(2, 1, 32, 32), index[:2]) == 1.5).all()


def test_mirrored_teacher_averages_outputs_and_features_with_its_mirror_view():
    torch.manual_seed(0)
    unet = UNet(2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits, feats = models.Mirrored(unet)(x, return_features=True)
        (z, f), (zm, fm) = unet(x, return_features=True), unet(x.flip(-1), return_features=True)
        for w in range(32):  # column by column: column w of the mirror view is the image's column 31 - w
            assert torch.allclose(logits[..., w], (z[..., w] + zm[..., 31 - w]) / 2, atol=1e-6)
        b, bm = f["bottleneck"], fm["bottleneck"]
        assert torch.allclose(feats["bottleneck"], (b + bm.flip(-1)) / 2, atol=1e-6)
        assert not torch.allclose(logits, z, atol=1e-3)  # the mirror view changes something
        assert torch.equal(models.Mirrored(unet)(x), logits)
    # class teachers take each image's class index after the image: it reaches them unchanged
    teachers = models.ClassTeachers([Constant(1.0), Constant(2.0)], ["benign", "malignant"])
    index = torch.tensor([1, 0])
    out, out_feats = models.Mirrored(teachers)(torch.zeros(2, 1, 32, 32), index, return_features=True)
    assert (out[0] == 2.0).all() and (out[1] == 1.0).all() and (out_feats["bottleneck"][0] == 2.0).all()
    assert models.Mirrored(teachers).feature_channels == teachers.feature_channels


def test_dckd_projector_learns_and_is_not_saved(tiny_teacher, tmp_path, monkeypatch):
    made, initial = [], []
    real = kd.Projector

    def recorded(*a):
        made.append(real(*a))
        initial.append({k: v.clone() for k, v in made[-1].state_dict().items()})
        return made[-1]

    monkeypatch.setattr(kd, "Projector", recorded)
    train_student.main(["--teacher", tiny_teacher[0], "--pathway", "dckd", "--dckd_level", "dec3", "--width", "2",
                        "--no-alone", "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / "s.pt")])
    after = made[0].state_dict()
    for name in ("0.weight", "3.weight"):  # both convolutions: Adam moved them, so gradients reached them
        assert not torch.equal(after[name], initial[0][name]), name
    saved = runs.load_checkpoint(str(tmp_path / "s.pt"), "student")["model"]
    assert sorted(saved) == sorted(UNet(2).state_dict())


@pytest.fixture(scope="module")
def class_teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    for c in ("benign", "malignant"):
        train_teacher.main(TINY + ["--width", "4", "--only_class", c, "--out", str(folder / f"{c}.pt")])
    return folder


def test_class_teachers_refuse_a_class_without_teacher_before_training(tmp_path, monkeypatch):
    three = TINY + ["--classes", "benign,malignant,normal", "--width", "2"]
    for c in ("benign", "malignant"):
        train_teacher.main(three + ["--only_class", c, "--out", str(tmp_path / f"{c}.pt")])
    monkeypatch.setattr(kd, "fit", lambda *a, **k: pytest.fail("training started"))
    words = ["--class_teachers", f"benign={tmp_path / 'benign.pt'},malignant={tmp_path / 'malignant.pt'}",
             "--pathway", "joint", "--out", str(tmp_path / "s.pt")]
    with pytest.raises(UserError, match="--class_teachers: the data holds 8 normal images and no teacher of class normal"):
        train_student.main(words)


def test_t2kd_student_runs_and_refuses_wrong_class_teachers(class_teachers, tiny_teacher, tmp_path):
    pair = f"benign={class_teachers / 'benign.pt'},malignant={class_teachers / 'malignant.pt'}"
    s = train_student.main(["--class_teachers", pair, "--pathway", "joint", "--sup", "wb", "--width", "2",
                            "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / "s.pt")])
    assert s["teacher_parameters"] == 2 * count_parameters(UNet(4)) and len(s["teacher_test"]["per_image_dice"]) == 12
    alone = runs.load_checkpoint(str(tmp_path / "student_alone.pt"), "student")
    assert alone["args"]["sup"] == "wb"  # the student alone has the same L_sup: the gain is distillation's
    swapped = f"benign={class_teachers / 'malignant.pt'},malignant={class_teachers / 'benign.pt'}"
    for words, message in ((["--class_teachers", swapped], "trained on malignant images only"),
                           (["--class_teachers", f"benign={tiny_teacher[0]},malignant={class_teachers / 'malignant.pt'}"],
                            "trained on every class"),
                           (["--class_teachers", f"benign={class_teachers / 'benign.pt'}"], "two or more classes"),
                           (["--teacher", str(class_teachers / "benign.pt")], "a class teacher")):
        with pytest.raises(UserError, match=message):
            train_student.main(words + ["--out", str(tmp_path / "x.pt")])
    leaky = leaky_copy(class_teachers / "malignant.pt", tmp_path / "leaky.pt")
    with pytest.raises(UserError, match="split differs"):
        train_student.main(["--class_teachers", f"benign={class_teachers / 'benign.pt'},malignant={leaky}",
                            "--out", str(tmp_path / "x.pt")])


# ----------------------------------------------------------------------------- study.py

STUDY_TINY = ["--data", "phantom", "--phantom_count", "24", "--size", "32", "--teacher_width", "4",
        "--student_width", "2", "--epochs", "1", "--batch_size", "8", "--folds", "2",
        "--device", "cpu", "--amp", "off", "--pictures", "2"]


# ----------------------------------------------------------------------------- study: the paired test and the table

def test_permutation_test_worked_by_hand():
    # d = a - b = [1, 2, -0.5], observed sum 2.5 (mean 5/6). The 2^3 = 8 sign patterns' sums:
    #   +1 +2 +0.5 =  3.5    +1 +2 -0.5 =  2.5    +1 -2 +0.5 = -0.5    +1 -2 -0.5 = -1.5
    #   -1 +2 +0.5 =  1.5    -1 +2 -0.5 =  0.5    -1 -2 +0.5 = -2.5    -1 -2 -0.5 = -3.5
    # |sum| >= 2.5 for 3.5, 2.5, -2.5, -3.5: 4 of 8, so the exact p is 0.5.
    assert study.paired_permutation_test([1, 2, -0.5], [0, 0, 0]) == 0.5
    assert study.paired_permutation_test([1.1, 2.3, 0.2], [0.1, 0.3, 0.7]) == pytest.approx(0.5)  # same d
    # d = [1, 2, 3]: only all-plus (6) and all-minus (-6) reach |sum| 6: p = 2/8.
    assert study.paired_permutation_test([1, 2, 3], [0, 0, 0]) == 0.25


def test_permutation_test_edges_and_monte_carlo():
    a = np.random.default_rng(1).random(30)
    assert study.paired_permutation_test(a[:5], a[:5]) == 1.0       # identical, exact
    assert study.paired_permutation_test(a, a) == 1.0               # identical, 30 pairs: Monte Carlo
    assert study.paired_permutation_test([], []) == 1.0
    # 30 differences all +1: no random pattern but all-plus/all-minus (odds 2^-29) reaches |sum| 30,
    # so p = (0 + 1) / (n_perm + 1).
    assert study.paired_permutation_test(np.ones(30), np.zeros(30), n_perm=999) == 1 / 1000
    b = a + np.random.default_rng(2).normal(0, 0.3, 30)
    p = study.paired_permutation_test(a, b, seed=3)
    assert p == study.paired_permutation_test(a, b, seed=3)  # fixed seed: repeatable
    # 21 pairs: Monte Carlo, against the exact p of all 2^21 sign patterns, enumerated by their bits
    d, hits = (a - b)[:21], 0
    for start in range(0, 2 ** 21, 2 ** 17):
        bits = (np.arange(start, start + 2 ** 17)[:, None] >> np.arange(21)) & 1
        hits += int(np.sum(np.abs((2 * bits - 1) @ d) >= abs(d.sum()) - 1e-9))
    exact = hits / 2 ** 21
    assert abs(study.paired_permutation_test(a[:21], b[:21], n_perm=20000, seed=3) - exact) < 0.015


def test_t_quantile_and_paired_interval():
    for df, t in ((1, 12.706), (2, 4.303), (8, 2.306), (30, 2.042)):  # a printed t table, 0.975 column
        assert kd.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    d = [1.0, 2.0, 3.0, 6.0]  # mean 3, sd sqrt(14/3), t(0.975, 3) = 3.182
    mean, low, high = kd.paired_interval(d)
    half = 3.1824 * math.sqrt(14 / 3) / 2
    assert mean == 3.0 and low == pytest.approx(3 - half, abs=1e-3) and high == pytest.approx(3 + half, abs=1e-3)
    assert kd.paired_interval([0.5]) == (0.5, None, None)
    assert study.verdict((1, 0.1, 2)) == "above 0" and study.verdict((-1, -2, -0.1)) == "below 0"
    assert study.verdict((0.5, -0.1, 1.1)) == "too close to call"


def test_p_values_at_the_monte_carlo_floor_are_printed_as_a_bound():
    assert study._p(1 / 10001, 10000) == "< 1e-04" and study._p(2 / 10001, 10000) == "2.0e-04"
    assert study._p(0.25, 10000) == "0.2500" and study._p(None, 10000) == "—"
    assert study._p(2 / 2 ** 16, 10000, exact=True) == "3.1e-05"  # exact over 16 pairs: no floor to speak of


def test_summary_pairs_runs_by_fold_and_seed():
    def rec(row, fold, seed, dice):
        names = [f"f{fold}/img{i}" for i in range(len(dice))]
        return dict(row=row, fold=fold, seed=seed, dice=float(np.mean(dice)), val_dice=0.5, iou=0.5,
                    per_image_dice=dice, names=names, parameters=10, train_seconds=2.0, precision="fp32",
                    epoch=10 if row == "Teacher" and seed == 1 else 5, argv=["--epochs", "10"])
    rng = np.random.default_rng(0)
    keys = [(f, s) for f in (0, 1) for s in (0, 1)]
    base = {k: list(rng.random(12)) for k in keys}
    shift = {(0, 0): 0.10, (0, 1): 0.20, (1, 0): 0.30, (1, 1): 0.40}  # the distilled row's gain per run
    records = {}
    for k in keys:
        records[("Teacher",) + k] = rec("Teacher", *k, [x + 0.5 for x in base[k]])
        records[("Student",) + k] = rec("Student", *k, base[k])
        records[("L_KLD",) + k] = rec("L_KLD", *k, [x + shift[k] for x in base[k]])
    summary = study.summarise(records, ["Teacher", "Student", "L_KLD"], n_perm=999, perm_seed=0)
    s = summary["L_KLD"]
    assert s["runs"] == 4 and s["folds"] == [0, 1] and s["seeds"] == [0, 1]
    mean, low, high = s["gain"]
    assert mean == pytest.approx(0.25)
    half = kd.t_quantile(0.975, 3) * np.std(list(shift.values()), ddof=1) / 2
    assert low == pytest.approx(0.25 - half) and high == pytest.approx(0.25 + half)
    assert s["gain_by_fold"] == pytest.approx({0: 0.15, 1: 0.35}) and s["gain_by_seed"] == pytest.approx({0: 0.2, 1: 0.3})
    share, lo, hi = s["share_of_lead"]  # gains 0.1-0.4 of a lead of 0.5 in every pair
    assert s["teacher_lead"] == pytest.approx(0.5) and share == pytest.approx(0.5)
    assert lo == pytest.approx((0.25 - half) / 0.5) and hi == pytest.approx((0.25 + half) / 0.5)  # a fixed lead
    # images matched by fold and name, each averaged over the two seeds: 24 images, not 48 image-seed pairs
    assert s["pairs_vs_student"] == 24 and s["p_vs_student"] == 1 / 1000  # every image better: p at its floor
    mine, theirs = study.per_image_means(records, "L_KLD", "Student")
    assert mine[0] == pytest.approx(np.mean([base[0, 0][0] + 0.1, base[0, 1][0] + 0.2]))
    assert theirs[0] == pytest.approx(np.mean([base[0, 0][0], base[0, 1][0]]))
    groups = {f"f{f}/img{i}": i // 2 for f in (0, 1) for i in range(12)}  # near-copies two by two
    g_mine, g_theirs = study.per_image_means(records, "L_KLD", "Student", groups)
    assert len(g_mine) == 12 and g_mine[0] == pytest.approx((mine[0] + mine[1]) / 2)  # img0 and img1: one unit
    assert g_theirs[0] == pytest.approx((theirs[0] + theirs[1]) / 2)
    grouped = study.summarise(records, ["Student", "L_KLD"], n_perm=999, perm_seed=0, groups=groups)["L_KLD"]
    assert grouped["pairs_vs_student"] == 12 and grouped["p_vs_student"] == 2 / 2 ** 12  # exact, two-sided: 12 units
    assert summary["Teacher"]["late_best"] == 2 and s["late_best"] == 0  # kept epoch 10 of 10: still improving
    assert summary["Student"]["p_vs_student"] is None and summary["Student"]["gain"] == (None, None, None)
    table = study.format_table(summary, study.options().parse_args(["--n_perm", "999"]))
    assert "each image one unit" in table and "group of near-copies" not in table
    assert "each group one unit" in study.format_table(summary, study.options().parse_args([]), grouped=True)
    assert "| L_KLD | 4 |" in table and "| +15.00 / +35.00; +20.00 / +30.00 |" in table and "| < 1e-03 |" in table
    assert f"as many runs as the student alone): L_KLD, gain {study.gain_text(s['gain'])}, above 0." in table
    records[("H_MSE", 0, 0)] = rec("H_MSE", 0, 0, base[0, 0])  # one run of four: named, never chosen
    fewer = study.format_table(study.summarise(records, ["Student", "L_KLD", "H_MSE"], 99, 0), study.options().parse_args([]))
    assert "as many runs as the student alone: L_KLD; 1 of 2 rows have fewer runs): L_KLD, gain" in fewer
    # a row distilled on fold 0 only: its share is of its teacher's lead on fold 0, not on every fold
    for k in keys:
        records[("Teacher_WAug",) + k] = rec("Teacher_WAug", *k, [x + (0.2 if k[0] == 0 else 0.6) for x in base[k]])
        if k[0] == 0:
            records[("L_KLD_WAug_Ens3",) + k] = rec("L_KLD_WAug_Ens3", *k, [x + 0.1 for x in base[k]])
    ens = study.summarise(records, ["Teacher_WAug", "Student", "L_KLD_WAug_Ens3"], 99, 0)["L_KLD_WAug_Ens3"]
    assert ens["teacher_lead"] == pytest.approx(0.2) and ens["share_of_lead"][0] == pytest.approx(0.5)
    # two pairs whose leads are both positive but whose t interval spans 0: a share, no interval
    assert study.share_interval([1.00, 0.63], [4.38, 2.77]) == (pytest.approx(1.63 / 7.15), None, None)
    # Fieller's interval against a scan: every share r whose t interval of gain - r * lead holds 0
    rng = np.random.default_rng(0)
    gains, leads = rng.normal(1, 0.8, 9), rng.normal(3, 1.2, 9)
    share, low, high = study.share_interval(gains, leads)
    r = np.linspace(-2, 3, 50001)
    d = gains[None, :] - r[:, None] * leads[None, :]
    inside = r[np.abs(d.mean(1)) <= kd.t_quantile(0.975, 8) * d.std(1, ddof=1) / 3]
    assert share == pytest.approx(gains.mean() / leads.mean()) and low < share < high
    assert low == pytest.approx(inside.min(), abs=1e-4) and high == pytest.approx(inside.max(), abs=1e-4)
    assert np.all(np.diff(inside) < 1.5e-4)  # one interval, no gaps
    # a class teacher, tested on half the images: its gain is over the student alone on that half
    for k in keys:
        records[("Teacher_benign",) + k] = dict(rec("Teacher_benign", *k, [0.9] * 6), names=records[("Student",) + k]["names"][:6])
    half = study.summarise(records, ["Teacher_benign", "Student"], n_perm=99, perm_seed=0)["Teacher_benign"]["gain"]
    assert half[0] == pytest.approx(0.9 - np.mean([np.mean(base[k][:6]) for k in keys]))


# ----------------------------------------------------------------------------- study: end to end

def test_study_end_to_end_resumes_and_draws(tmp_path):
    out = str(tmp_path / "study")
    res = study.main(STUDY_TINY + ["--out", out])
    # Table 4's 14 rows, 3 more teachers, 5 more methods; not the ensemble row, which needs seeds 0-2
    assert len(res["ran"]) == 2 * (len(study.ROWS) - 1) == 2 * 22
    table = open(os.path.join(out, "table.md")).read()
    for row in [r for r in study.ROWS if "ensemble" not in study.ROWS[r]]:
        assert f"| {row} |" in table or f"| {row}* |" in table
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    ps = [s[k] for s in rows.values() for k in ("p_vs_teacher", "p_vs_student") if s[k] is not None]
    assert len(ps) == 2 * 22 - 2  # every row against Teacher and Student, but each against itself
    t2kd = json.load(open(os.path.join(out, "fold0", "seed0", "T2KD.json")))
    benign, malignant = (json.load(open(os.path.join(out, "fold0", "seed0", f"Teacher_{c}.json"))) for c in ("benign", "malignant"))
    assert t2kd["teacher_sha1"] == benign["sha1"] + "+" + malignant["sha1"]
    assert "--class_teachers" in t2kd["argv"] and t2kd["argv"][t2kd["argv"].index("--sup") + 1] == "wb"
    run = json.load(open(os.path.join(out, "fold0", "seed0", "L_KLD_WAug.json")))
    assert run["argv"][run["argv"].index("--teacher") + 1].endswith("Teacher_WAug.pt")
    assert len(run["per_image_dice"]) == len(run["names"]) == 12 and run["precision"] == "fp32"
    teacher = json.load(open(os.path.join(out, "fold0", "seed0", "Teacher_WAug.json")))
    assert run["teacher_sha1"] == teacher["sha1"] == runs.file_hash(os.path.join(out, "fold0", "seed0", "Teacher_WAug.pt"))

    # resumed: nothing re-runs, no JSON is rewritten, the table is the same
    jsons = glob.glob(os.path.join(out, "fold*", "seed*", "*.json"))
    mtimes = {p: os.path.getmtime(p) for p in jsons}
    again = study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])
    assert again["ran"] == [] and again["table"] == res["table"]
    assert {p: os.path.getmtime(p) for p in jsons} == mtimes
    # the records alone print the table: no checkpoint is needed when nothing must run
    for p in glob.glob(os.path.join(out, "fold1", "seed0", "*.pt")):
        os.remove(p)
    assert study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])["ran"] == []
    # --table_only trains nothing and prints the table of the records there are
    only = study.main(STUDY_TINY + ["--out", out, "--pictures", "0", "--table_only", "--seeds", "0,1"])
    assert only["ran"] == [] and only["table"] == res["table"]
    # a run killed before its record was written runs again, and only it
    os.remove(os.path.join(out, "fold0", "seed0", "H_MSE.json"))
    assert study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])["ran"] == [("H_MSE", 0, 0)]
    # a student whose teacher checkpoint is gone needs it again: the teacher is retrained, and every
    # student made from the old one runs again (their records name the old checkpoint)
    os.remove(os.path.join(out, "fold1", "seed0", "L_MSE_WAug.json"))
    ran = study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])["ran"]
    assert ran == [("Teacher_WAug", 1, 0)] + [(r, 1, 0) for r in study.ROWS if study.ROWS[r].get("teacher") == "Teacher_WAug"
                                                  and "ensemble" not in study.ROWS[r]]
    # other options in the same folder: refused, not mixed in; nor another precision for a new run
    with pytest.raises(UserError, match="--epochs"):
        study.main(STUDY_TINY + ["--out", out, "--epochs", "2"])
    dckd = json.load(open(os.path.join(out, "fold0", "seed0", "DCKD.json")))["argv"]
    assert dckd[dckd.index("--dckd_level") + 1] == "bottleneck"
    with pytest.raises(UserError, match=r"DCKD.json: made with other options: --dckd_level bottleneck \(now dec3\)"):
        study.main(STUDY_TINY + ["--out", out, "--dckd_level", "dec3"])
    # a DCKD record from before --dckd_level was an option is a bottleneck run
    old = [w for w in dckd if w not in ("--dckd_level", "bottleneck")]
    assert study._what(old) == study._what(dckd) != study._what(old + ["--dckd_level", "dec3"])
    os.remove(os.path.join(out, "fold0", "seed0", "H_MSE.json"))
    with pytest.raises(UserError, match="ran in fp32, this call would run H_MSE fold 0 seed 0 in bf16"):
        study.main(STUDY_TINY + ["--out", out, "--amp", "bf16"])

    tile = max(32, study.TILE_MIN)  # 5 columns, 2 images, a title line
    size = (5 * (tile + study.PAD) + study.PAD, study.TITLE + 2 * (tile + study.PAD) + study.PAD)
    assert Image.open(os.path.join(out, "pictures.png")).size == size


def test_study_seeds_are_paired_runs(tmp_path):
    out = str(tmp_path / "s")
    words = STUDY_TINY + ["--out", out, "--fold_list", "0", "--seeds", "0,1", "--rows", "Student,L_KLD", "--pictures", "0"]
    res = study.main(words)
    assert sorted(res["ran"]) == sorted((r, 0, s) for r in ("Teacher", "Student", "L_KLD") for s in (0, 1))
    s0 = json.load(open(os.path.join(out, "fold0", "seed0", "L_KLD.json")))
    s1 = json.load(open(os.path.join(out, "fold0", "seed1", "L_KLD.json")))
    assert s0["argv"][s0["argv"].index("--seed") + 1] == "0" and s1["argv"][s1["argv"].index("--seed") + 1] == "1"
    assert res["summary"]["L_KLD"]["runs"] == 2 and res["summary"]["L_KLD"]["gain"][1] is not None
    assert "seeds 0,1" in res["table"]

    # --ensembles: each seed's model scores what its record says, and the ensemble is the mean of
    # the seeds' logits, thresholded, worked out here by hand
    ens = study.main(words + ["--ensembles"])["ensembles"]
    assert list(ens) == ["Teacher", "Student"] and ens["Teacher"][0]["fold"] == 0
    for row in ("Teacher", "Student"):
        recs = [json.load(open(os.path.join(out, "fold0", f"seed{s}", f"{row}.json"))) for s in (0, 1)]
        assert ens[row][0]["val"]["each"] == pytest.approx([r["val_dice"] for r in recs], abs=1e-6)
        assert ens[row][0]["test"]["each"] == pytest.approx([r["dice"] for r in recs], abs=1e-6)
    # two teachers that disagree, one calling half the test pixels lesion, the other a tenth (a
    # one-epoch teacher calls none): their ensemble differs from both
    paths = [os.path.join(out, "fold0", f"seed{s}", "Teacher.pt") for s in (0, 1)]
    d, _ = runs.load_split_data(train_teacher.options().parse_args(STUDY_TINY[:6] + ["--folds", "2"]))
    test = json.load(open(os.path.join(out, "fold0", "seed0", "Teacher.json")))["names"]
    x, y = kd.batch(d.images, d.masks, torch.as_tensor([d.names.index(n) for n in test]))
    logits, mirrored = [], []
    for path, share in zip(paths, (0.5, 0.1)):
        ckpt = torch.load(path, weights_only=True)
        with torch.no_grad():
            model = runs.build_model(ckpt).eval()
            z = model(x)
            margin = z[:, 1] - z[:, 0]  # lesion where >= 0
            shift = torch.stack([torch.zeros(()), -margin.flatten().quantile(1 - share)]).view(1, 2, 1, 1)
            mirrored.append((z + model(x.flip(-1)).flip(-1)) / 2 + shift)  # the mirror image, mirrored back
        ckpt["model"]["head.bias"] += shift.flatten()
        torch.save(ckpt, path)
        logits.append(z + shift)
    each, mean = [kd.dice_iou(kd.lesion_mask(z), y)[0] for z in logits], kd.dice_iou(kd.lesion_mask(sum(logits) / 2), y)[0]
    assert not torch.equal(mean, each[0]) and not torch.equal(mean, each[1])
    flipped = [kd.dice_iou(kd.lesion_mask(z), y)[0].mean().item() for z in mirrored]
    assert flipped != pytest.approx([d.mean().item() for d in each], abs=1e-6)  # the mirror view changes something
    ens = study.main(words + ["--ensembles"])["ensembles"]
    assert ens["Teacher"][0]["test"]["per_image_dice"] == pytest.approx(mean.tolist(), abs=1e-6)
    assert ens["Teacher"][0]["test"]["flipped"] == pytest.approx(flipped, abs=1e-6)
    assert json.load(open(os.path.join(out, "ensembles_fold0_seed0-1.json")))["rows"]["Teacher"][0]["test"]["names"] == test
    with pytest.raises(UserError, match="trained at --size 32, scored here at 48"):  # not silently at another side
        study.main(words + ["--ensembles", "--size", "48"])
    for s in (0, 1):
        os.remove(os.path.join(out, "fold0", f"seed{s}", "Student.pt"))
        os.remove(os.path.join(out, "fold0", f"seed{s}", "Teacher.pt"))
    with pytest.raises(UserError, match="no row has checkpoints of every seed 0,1"):
        study.main(words + ["--ensembles"])


def test_study_ensemble_row_distils_every_seeds_teacher(tmp_path):
    out = str(tmp_path / "s")
    words = STUDY_TINY + ["--out", out, "--fold_list", "0", "--rows", "L_KLD_WAug_Ens3", "--pictures", "0"]
    with pytest.raises(UserError, match="--rows L_KLD_WAug_Ens3: it distils the ensemble of seeds 0,1,2"):
        study.main(words + ["--seeds", "0,1"])
    res = study.main(words + ["--seeds", "0,1,2"])
    teachers = [(t, 0, s) for s in (0, 1, 2) for t in ("Teacher", "Teacher_WAug")]
    assert sorted(res["ran"]) == sorted(teachers + [(r, 0, s) for s in (0, 1, 2) for r in ("Student", "L_KLD_WAug_Ens3")])
    assert res["ran"][-3:] == [("L_KLD_WAug_Ens3", 0, s) for s in (0, 1, 2)]  # after every seed's teachers
    folder = lambda s: os.path.join(out, "fold0", f"seed{s}")
    sha1 = [json.load(open(os.path.join(folder(s), "Teacher_WAug.json")))["sha1"] for s in (0, 1, 2)]
    for s in (0, 1, 2):
        rec = json.load(open(os.path.join(folder(s), "L_KLD_WAug_Ens3.json")))
        assert rec["argv"][rec["argv"].index("--teacher") + 1] == ",".join(
            os.path.join(folder(k), "Teacher_WAug.pt") for k in (0, 1, 2))
        assert rec["argv"][rec["argv"].index("--seed") + 1] == str(s) and rec["teacher_sha1"] == "+".join(sha1)
    assert study.main(words + ["--seeds", "0,1,2"])["ran"] == []
    # one member teacher trained again: the ensemble students of every seed run again, the others not
    os.remove(os.path.join(folder(1), "Teacher_WAug.json"))
    assert study.main(words + ["--seeds", "0,1,2"])["ran"] == [("Teacher_WAug", 0, 1)] + [
        ("L_KLD_WAug_Ens3", 0, s) for s in (0, 1, 2)]
    # a single-seed student to run again whose teacher's checkpoint is gone: that teacher trains
    # again, which makes the ensemble students run again, and they need the other seeds' teachers,
    # whose checkpoints are gone too: all three train again, before the ensemble students run
    words[words.index("--rows") + 1] = "L_KLD_WAug,L_KLD_WAug_Ens3"
    study.main(words + ["--seeds", "0,1,2"])
    os.remove(os.path.join(folder(0), "L_KLD_WAug.json"))
    for s in (0, 1, 2):
        os.remove(os.path.join(folder(s), "Teacher_WAug.pt"))
    assert study.main(words + ["--seeds", "0,1,2"])["ran"] == [
        (r, 0, s) for s in (0, 1, 2) for r in ("Teacher_WAug", "L_KLD_WAug")] + [("L_KLD_WAug_Ens3", 0, s) for s in (0, 1, 2)]


def test_study_teachers_may_train_longer_than_their_students(tmp_path):
    out = str(tmp_path / "s")
    res = study.main(STUDY_TINY + ["--out", out, "--fold_list", "0", "--rows", "Student,L_KLD", "--teacher_epochs", "2",
                                   "--pictures", "0"])
    epochs = {r: json.load(open(os.path.join(out, "fold0", "seed0", f"{r}.json"))) for r in ("Teacher", "Student", "L_KLD")}
    assert [len(epochs[r]["history"]) for r in ("Teacher", "Student", "L_KLD")] == [2, 1, 1]
    assert "at most 1 epochs (teachers 2)" in res["table"]
    with pytest.raises(UserError, match=r"Teacher.json: made with other options: --epochs 2 \(now 1\)"):
        study.main(STUDY_TINY + ["--out", out, "--fold_list", "0", "--rows", "Student,L_KLD", "--pictures", "0"])


def test_study_of_another_student_width_reuses_copied_teachers(tmp_path):
    """The size trend's cheap path: a study folder of another --student_width with the first one's
    teacher records and checkpoints copied in trains its students only, from those very teachers."""
    a, b = str(tmp_path / "w2"), str(tmp_path / "w3")
    words = STUDY_TINY + ["--fold_list", "0", "--rows", "Student,L_KLD", "--pictures", "0"]
    assert study.main(words + ["--out", a])["ran"] == [("Teacher", 0, 0), ("Student", 0, 0), ("L_KLD", 0, 0)]
    os.makedirs(os.path.join(b, "fold0", "seed0"))
    for f in ("Teacher.json", "Teacher.pt"):
        shutil.copy(os.path.join(a, "fold0", "seed0", f), os.path.join(b, "fold0", "seed0", f))
    first = {r: study.stored(r, 0, 0, study.options().parse_args(words + ["--out", a])) for r in ("Teacher", "L_KLD")}
    shutil.rmtree(a)  # the copies alone remain
    assert study.main(words + ["--out", b, "--student_width", "3"])["ran"] == [("Student", 0, 0), ("L_KLD", 0, 0)]
    with open(os.path.join(b, "fold0", "seed0", "L_KLD.json")) as f:
        wider = json.load(f)
    assert wider["teacher_sha1"] == first["Teacher"]["sha1"]
    assert wider["argv"][wider["argv"].index("--teacher") + 1] == os.path.join(b, "fold0", "seed0", "Teacher.pt")
    assert wider["parameters"] > first["L_KLD"]["parameters"]  # a wider student, from the same teacher


HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"%d elsewhere\\n" % os.getpid())
print("held", flush=True)
time.sleep(300)
"""  # another process that holds a run's lock, as a study does while it trains that run


@pytest.mark.skipif(os.name == "nt", reason="the other process holds its lock with fcntl")
def test_study_waits_for_a_run_another_process_holds(tmp_path, monkeypatch, capsys):
    """A run another process holds is left to it: this study trains everything else first, then waits.
    When the other process finishes the run, its record is used; when it ends without finishing it
    (killed), its lock goes with it and this study trains the run itself."""
    words = STUDY_TINY + ["--fold_list", "0", "--rows", "L_KLD,L_KLD_WAug", "--pictures", "0"]
    done = os.path.join(str(tmp_path / "done"), "fold0", "seed0")  # the run as the other process leaves it
    study.main(words + ["--out", str(tmp_path / "done")])
    real_pass = study.one_pass
    for finishes in (True, False):
        out = str(tmp_path / f"finishes_{finishes}")
        args = study.options().parse_args(words + ["--out", out])
        lock = study.lock_path("Teacher_WAug", 0, 0, args)
        os.makedirs(os.path.dirname(lock))
        other = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE, text=True)
        naps = []

        def nap(seconds):  # while this study waits, the other process finishes the run, or is killed
            naps.append(seconds)
            assert len(naps) == 1, "waits again for a run no one holds"
            if finishes:
                for f in ("Teacher_WAug.json", "Teacher_WAug.pt"):
                    shutil.copy(os.path.join(done, f), os.path.join(out, "fold0", "seed0", f))
            other.kill()
            other.wait()
        try:
            assert other.stdout.readline() == "held\n"
            assert study.is_held("Teacher_WAug", 0, 0, args) and not study.claim("Teacher_WAug", 0, 0, args)
            monkeypatch.setattr(study, "time", types.SimpleNamespace(sleep=nap))
            passes = []

            def one_pass(*a):  # a wait that does not wait would pass again and again
                passes.append(1)
                assert len(passes) <= 2, "passes without waiting"
                return real_pass(*a)
            monkeypatch.setattr(study, "one_pass", one_pass)
            ran = study.main(words + ["--out", out])["ran"]
        finally:
            other.kill()
            other.wait()
        first = [("Teacher", 0, 0), ("Student", 0, 0), ("L_KLD", 0, 0)]  # not L_KLD_WAug: its teacher is held
        assert ran == first + ([] if finishes else [("Teacher_WAug", 0, 0)]) + [("L_KLD_WAug", 0, 0)]
        assert naps == [study.WAIT_SECONDS] and not study.is_held("Teacher_WAug", 0, 0, args)
        assert f"waiting: process {other.pid} on elsewhere holds fold 0 seed 0 Teacher_WAug\n" in capsys.readouterr().out
        with open(os.path.join(out, "fold0", "seed0", "L_KLD_WAug.json")) as fh:
            student = json.load(fh)
        assert student["teacher_sha1"] == runs.file_hash(os.path.join(out, "fold0", "seed0", "Teacher_WAug.pt"))
        assert (student["teacher_sha1"] == runs.file_hash(os.path.join(done, "Teacher_WAug.pt"))) == finishes


def test_study_two_processes_share_the_runs(tmp_path):
    """The same command twice at once on one folder: every run is trained once, by one of the two."""
    words = STUDY_TINY + ["--fold_list", "0", "--rows", "L_KLD,L_KLD_WAug,T2KD_noWB", "--pictures", "0",
                          "--out", str(tmp_path / "study")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(tmp_path / f"log{i}", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "study.py"), *words], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL) for log in logs]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outputs = [open(log.name).read() for log in logs]
    assert codes == [0, 0], outputs
    trained = sorted(m for o in outputs for m in re.findall(r"^=== \[\d+/\d+\] fold 0 seed 0 (\w+):", o, re.M))
    assert trained == sorted(["Teacher", "Teacher_WAug", "Teacher_benign", "Teacher_malignant", "Student", "L_KLD",
                              "L_KLD_WAug", "T2KD_noWB"])
    assert glob.glob(str(tmp_path / "study" / "fold0" / "seed0" / "*.lock")) == []  # each let go as its run ended


def test_study_trend_puts_student_widths_side_by_side(tmp_path):
    """Two study folders' results.json, made from hand-made records: the trend keeps each folder's
    student alone and its distilled row of highest validation Dice, sorted by parameters, with the lead
    of that row's teacher and the share of it recovered, where the folder has that teacher. The narrow
    student trained twice as long from the same teachers is a point of the trend; a folder whose
    teachers trained for other epochs is not."""
    def rec(row, seed, dice, val_dice, params):
        return dict(row=row, fold=0, seed=seed, dice=dice, val_dice=val_dice, iou=0.5, per_image_dice=[dice],
                    names=["img0"], parameters=params, train_seconds=1.0, precision="fp32", epoch=5, argv=["--epochs", "10"])
    made = {  # width -> row -> (Dice of seeds 0, 1, 2; validation Dice; parameters)
        10: {"Teacher": ([0.80, 0.83, 0.81], 0.8, 7760),  # the teacher L_KLD distils from: its lead and share
             "Student": ([0.60, 0.64, 0.62], 0.6, 760), "L_KLD": ([0.70, 0.66, 0.71], 0.9, 760),
             "H_MSE": ([0.80, 0.81, 0.82], 0.7, 760)},  # best on test, not on validation: not chosen
        4: {"Student": ([0.50, 0.40, 0.45], 0.5, 120), "H_MSE": ([0.52, 0.44, 0.45], 0.8, 120),
            "L_MSE": ([0.90], 0.99, 120)}}  # one run against the student alone's three: not chosen
    options = {10: dict(student_width=10, epochs=10, teacher_epochs=0),  # 0: the teachers' epochs are --epochs
               4: dict(student_width=4, epochs=20, teacher_epochs=10)}
    folders = []
    for w, rows in made.items():
        records = {(r, 0, k): rec(r, k, d[k], v, p) for r, (d, v, p) in rows.items() for k in range(len(d))}
        summary = study.summarise(records, list(rows), n_perm=99, perm_seed=0)
        folders.append(str(tmp_path / f"w{w}"))
        os.makedirs(folders[-1])
        with open(os.path.join(folders[-1], "results.json"), "w") as f:
            json.dump(dict(options=options[w], rows=summary), f)
    t = kd.t_quantile(0.975, 2)
    ci = lambda xs, fmt: f"{fmt(100 * np.mean(xs))} [{fmt(100 * (np.mean(xs) - t * np.std(xs, ddof=1) / np.sqrt(3)))}, " \
                         f"{fmt(100 * (np.mean(xs) + t * np.std(xs, ddof=1) / np.sqrt(3)))}]"
    plain, signed = "{:.2f}".format, "{:+.2f}".format
    expected = []
    for w, best in ((4, "H_MSE"), (10, "L_KLD")):
        alone, mine = made[w]["Student"][0], made[w][best][0]
        gains = [b - a for a, b in zip(alone, mine)]
        lead, share = "—", "—"
        if "Teacher" in made[w]:
            leads = [b - a for a, b in zip(alone, made[w]["Teacher"][0])]
            lead, share = ci(leads, signed), study.share_text(study.share_interval(gains, leads))
            assert share.count("%") == 3  # the lead is clear, so the share has its interval
        expected.append(f"| {w} | {runs.fmt_params(made[w]['Student'][2])} | {options[w]['epochs']} | "
                        f"3, {ci(alone, plain)} | {best} | "
                        f"3, {ci(mine, plain)} | {ci(gains, signed)} | {lead} | {share} |")
    assert study.main(STUDY_TINY + ["--trend", ",".join(folders)])["table"].splitlines()[2:] == expected
    with pytest.raises(UserError, match=f"--trend {tmp_path}: no results.json there"):
        study.main(STUDY_TINY + ["--trend", str(tmp_path)])
    with pytest.raises(UserError, match="--trend ,: give the folders of finished studies"):
        study.main(["--trend", ","])
    other = tmp_path / "w6"  # teachers of other epochs: not a point of the same trend
    other.mkdir()
    (other / "results.json").write_text(json.dumps(dict(options=dict(student_width=6, epochs=20), rows=summary)))
    with pytest.raises(UserError, match=r"w6: made with other options than .*w10: --teacher_epochs 20 \(there 10\)"):
        study.main(STUDY_TINY + ["--trend", ",".join(folders + [str(other)])])


def results_readme_study_commands(flag):
    """The `python study.py ...` commands of results/README.md's bash blocks that pass flag, as
    argument lists (continued lines joined)."""
    text = open(os.path.join(HERE, "results", "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [line.split()[2:] for line in lines if line.startswith("python study.py") and flag in line]


def results_readme_table_commands():
    """The `python study.py ... --table_only` commands of results/README.md, as argument lists; those
    of BUSI need BUSI_DIR."""
    commands = results_readme_study_commands("--table_only")
    return [pytest.param(argv, id=argv[argv.index("--out") + 1],
                         marks=[] if argv[argv.index("--data") + 1] == "phantom" else [needs_busi]) for argv in commands]


@pytest.mark.parametrize("argv", results_readme_table_commands())
def test_results_readme_commands_print_the_committed_tables(tmp_path, argv):
    """Each table command of results/README.md, run on a copy of its committed records, prints the
    committed table.md, and a table shown in results/README.md is that table.md line for line."""
    argv = list(argv)
    folder, data_arg = argv[argv.index("--out") + 1], argv[argv.index("--data") + 1]
    if data_arg != "phantom":
        argv[argv.index("--data") + 1] = BUSI_DIR
    shutil.copytree(os.path.join(HERE, folder), tmp_path / "records")
    argv[argv.index("--out") + 1] = str(tmp_path / "records")
    printed = study.main(argv)["table"].replace(f"Data: {BUSI_DIR},", f"Data: {data_arg},")
    committed = open(os.path.join(HERE, folder, "table.md")).read().rstrip("\n")
    assert printed == committed
    readme = open(os.path.join(HERE, "results", "README.md")).read()
    data_line = next(line for line in committed.splitlines() if line.startswith("Data: "))
    if data_line in readme:  # shown there: the whole table, not an older one with today's data line
        assert committed in readme


def test_results_readme_trend_commands_print_the_tables_shown():
    """Each `python study.py --trend ...` command of results/README.md, run on the committed study
    folders' results.json, prints a table that results/README.md shows whole."""
    text = open(os.path.join(HERE, "results", "README.md")).read()
    commands = results_readme_study_commands("--trend")
    assert commands, "results/README.md shows no --trend command"
    for argv in commands:
        folders = argv[argv.index("--trend") + 1].split(",")
        table = study.main(["--trend", ",".join(os.path.join(HERE, f) for f in folders)])["table"]
        assert table in text


@pytest.mark.parametrize("words, message", [(["--rows", "L_XYZ"], "L_XYZ"), (["--fold_list", "5"], "5"),
                                            (["--folds", "1"], "--folds 1: must be at least 2"),
                                            (["--epochs", "0"], "--epochs 0: must be at least 1"),
                                            (["--seeds", "0,-1"], "--seeds 0,-1: give whole numbers, 0 or more"),
                                            (["--perm_seed", "-1"], "--perm_seed")])
def test_bad_options_are_one_line_errors(tmp_path, words, message):
    with pytest.raises(UserError, match=message):
        study.main(STUDY_TINY + ["--out", str(tmp_path)] + words)


def test_study_refuses_class_teachers_that_the_data_cannot_have(tmp_path, monkeypatch):
    for i, lesion in enumerate((True, False, True, True, False, True)):  # a folder of images/ + masks/: no classes
        m = np.zeros((32, 32), np.uint8)
        m[8:16, 8:16] = 255 if lesion else 0
        save_png(f"{tmp_path}/d/images/{i}.png", np.full((32, 32), 40 + 20 * i, np.uint8))
        save_png(f"{tmp_path}/d/masks/{i}.png", m)
    with pytest.raises(UserError, match="--rows: T2KD's class teachers need benign and malignant images"):
        study.main(["--data", str(tmp_path / "d"), "--size", "32", "--rows", "T2KD", "--out", str(tmp_path / "s")])
    assert not os.path.exists(tmp_path / "s" / "fold0")  # nothing trained
    planned = []  # --rows all: the study goes on without T2KD's rows

    def first_pass(f, seeds, teachers, students, *a):
        planned.extend(teachers + students)
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "one_pass", first_pass)
    with pytest.raises(SystemExit):
        study.main(["--data", str(tmp_path / "d"), "--size", "32", "--rows", "all", "--out", str(tmp_path / "s")])
    assert "Teacher" in planned and "DCKD" in planned and not {"T2KD", "T2KD_noWB", "Teacher_benign"} & set(planned)


def test_study_groups_only_the_records_own_data(tmp_path, capsys):
    args = study.options().parse_args(["--data", "phantom", "--phantom_count", "24", "--size", "32"])
    d = data.load_data("phantom", ("benign", "malignant"), 32, 24, 0)
    groups = study.image_groups(args, d.fingerprint())
    assert groups == dict(zip(d.names, data.near_duplicate_groups(d.thumbnails, d.hashes, 0.95)))
    assert study.image_groups(args, "another data set") is None and "not the data of the records" in capsys.readouterr().out
    args.data = str(tmp_path / "gone")  # records whose data is not on this disk: the table from the records alone
    assert study.image_groups(args, d.fingerprint()) is None and "counts every image" in capsys.readouterr().out


def test_study_refuses_a_file_as_its_folder_and_a_broken_results_json(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(UserError, match=r"--out .*f: that is a file; give a folder"):
        study.main(STUDY_TINY + ["--out", str(tmp_path / "f")])
    for text in ("{", '{"options": {}}'):  # not JSON; JSON without the rows
        os.makedirs(tmp_path / "t", exist_ok=True)
        (tmp_path / "t" / "results.json").write_text(text)
        with pytest.raises(UserError, match=r"--trend .*t: its results.json is not a study's"):
            study.main(["--trend", str(tmp_path / "t")])


# ----------------------------------------------------------------------------- predict and export: shared set-ups

RESULT = re.compile(r"^RESULT model=(\w+) device=(\w+) metric=(\w+) value=(\S+)$")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A small teacher trained just enough (about 6 s) to find lesions: after a few epochs its masks are empty."""
    path = tmp_path_factory.mktemp("ckpt") / "t.pt"
    train_teacher.main(["--data", "phantom", "--phantom_count", "48", "--size", "32", "--width", "8", "--epochs", "20",
                        "--lr", "3e-3", "--aug", "none", "--batch_size", "4", "--device", "cpu", "--out", str(path)])
    return path


@pytest.fixture
def image_files(tmp_path):
    """Three phantom images as PNG files of other sizes than the model's, one of them RGB."""
    d = data.make_phantom(3, 64, seed=1)
    folder = tmp_path / "scans"
    folder.mkdir()
    files = []
    for i, size in enumerate([(80, 60), (64, 64), (45, 70)]):
        im = Image.fromarray(d.images[i, 0].numpy()).resize(size, Image.BILINEAR)
        files.append(folder / f"scan{i}.png")
        (im.convert("RGB") if i == 2 else im).save(files[-1])
    return files


# ----------------------------------------------------------------------------- predict and export: fast inference

def test_fused_fp32_equals_plain():
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet(4))
    fused = models.fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = data.normalize(data.make_phantom(4, 64, seed=2).images.float() / 255)
    with torch.no_grad():
        ref = model(x)
    fast = models.fast_model(model, torch.device("cpu"), None)
    with torch.no_grad():
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.equal(models.lesion_probability(fast, x) >= 0.5, ref.softmax(1)[:, 1:] >= 0.5)


def test_fast_bf16_matches_fp32():
    """Random weights: the lesion probability of the bf16 fast form is fp32's up to bf16 rounding."""
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet(4))
    x = data.normalize(data.make_phantom(4, 64, seed=3).images.float() / 255)
    with torch.no_grad():
        ref = model(x).softmax(1)[:, 1:]
    fast = models.fast_model(model, torch.device("cpu"), torch.bfloat16)
    assert next(fast.parameters()).dtype == torch.bfloat16
    prob = models.lesion_probability(fast, x.contiguous(memory_format=torch.channels_last))
    assert prob.dtype == torch.float32 and prob.shape == ref.shape
    assert (prob - ref).abs().max().item() < 0.02  # bf16 keeps about 3 significant digits


def test_fast_bf16_masks_match_fp32_trained(teacher_ckpt):
    """A trained model: the bf16 fast form's masks are the fp32 model's (Dice of one against the other)."""
    model = runs.build_model(runs.load_checkpoint(str(teacher_ckpt), "teacher"))
    x = data.normalize(data.make_phantom(16, 32, seed=5).images.float() / 255)
    with torch.no_grad():
        ref = model(x).softmax(1)[:, 1:] >= 0.5
    fast = models.fast_model(model, torch.device("cpu"), torch.bfloat16)
    pred = models.lesion_probability(fast, x.contiguous(memory_format=torch.channels_last)) >= 0.5
    assert ref.float().mean() > 0.02  # it does find lesions
    dice, _ = kd.dice_iou(pred, ref)
    assert dice.mean().item() > 0.97
    assert (pred == ref).float().mean().item() > 0.995


# ----------------------------------------------------------------------------- predict and export: predict.py

def test_preprocessing_matches_training(tmp_path, image_files):
    """predict.preprocess gives the very tensor training gives for the same file (load_folder + kd.batch)."""
    (tmp_path / "scans" / "masks").mkdir()
    (tmp_path / "scans" / "images").mkdir()
    im = Image.open(image_files[0])
    im.save(tmp_path / "scans" / "images" / "a.png")
    Image.new("L", im.size).save(tmp_path / "scans" / "masks" / "a.png")
    ds = data.load_folder(str(tmp_path / "scans"), size=32)
    x_train, _ = kd.batch(ds.images, ds.masks, torch.tensor([0]))
    x_pred = predict.preprocess(data.open_image(image_files[0], "L"), 32, torch.device("cpu"))
    assert x_pred.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_pred, x_train)


@on_devices
def test_predict_writes_masks_and_overlays(tmp_path, teacher_ckpt, image_files, capsys, device):
    out = tmp_path / "pred"
    written = predict.main(["--checkpoint", str(teacher_ckpt), str(image_files[0]), str(image_files[1].parent),
                            "--out", str(out), "--threshold", "0.3", "--device", device])
    assert len(written) == 3  # the file named, then the folder's three images: scan0 once
    for f in image_files:
        mask = Image.open(out / f"{f.stem}_mask.png")
        ov = Image.open(out / f"{f.stem}_overlay.png")
        assert mask.size == Image.open(f).size == ov.size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert ov.mode == "RGB"
    assert any(np.asarray(Image.open(m)).any() for _, m in written)  # some lesion found: contours drawn
    assert "ms per frame" in capsys.readouterr().out


def test_predict_refuses_bad_inputs(tmp_path, teacher_ckpt, image_files):
    ck = ["--checkpoint", str(teacher_ckpt), "--out", str(tmp_path / "p")]
    with pytest.raises(data.UserError, match="no such file"):
        predict.main(ck + [str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(data.UserError, match="no images in this folder"):
        predict.main(ck + [str(tmp_path / "empty")])
    with pytest.raises(data.UserError, match="no input images"):
        predict.main(ck)
    with pytest.raises(data.UserError, match="nope.pt: file not found; train one with"):
        predict.main(["--checkpoint", str(tmp_path / "nope.pt"), str(image_files[0])])


def test_predict_refuses_a_file_as_its_output_folder(tmp_path, teacher_ckpt, image_files):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(UserError, match=r"--out .*f: that is a file; give a folder"):
        predict.main(["--checkpoint", str(teacher_ckpt), str(image_files[0]), "--out", str(tmp_path / "f")])


def test_predict_corrupt_png_one_line_error(tmp_path, teacher_ckpt, image_files):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"these are not the bytes of a PNG file")
    r = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(teacher_ckpt), str(image_files[0]), str(bad),
                        "--out", str(tmp_path / "p")], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(predict.__file__)))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "x.png" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def disc_probability(size, radius=9.3, soft=1.5):
    """A hand-made lesion probability (1, 1, size, size): a smooth disc, 1 inside, 0 outside."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    r = ((yy - size / 2 + 0.3) ** 2 + (xx - size / 2 - 0.2) ** 2).sqrt()
    return torch.sigmoid((radius - r) / soft).float()[None, None]


def bilinear_by_hand(p, height, width):
    """(S, S) -> (height, width) in float64: bilinear with half-pixel centres, edges clamped."""
    p = np.asarray(p, np.float64)

    def weights(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = weights(height, p.shape[0])
    x0, x1, wx = weights(width, p.shape[1])
    rows = p[y0] * (1 - wy)[:, None] + p[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def predict_hand_made(tmp_path, ckpt, monkeypatch, probability, extra=()):
    """predict.main on one 160x128 image with the model's output replaced by `probability`."""
    (tmp_path / "in").mkdir(exist_ok=True)
    Image.fromarray(np.full((128, 160), 90, np.uint8)).save(tmp_path / "in" / "a.png")
    monkeypatch.setattr(predict, "lesion_probability", lambda model, x: probability.to(x.device).expand(len(x), -1, -1, -1))
    out = tmp_path / "out"
    predict.main(["--checkpoint", str(ckpt), str(tmp_path / "in" / "a.png"), "--out", str(out), "--device", "cpu",
                  *extra])
    return out


def row_widths(mask):
    return [int(w) for w in (np.asarray(mask) > 0).sum(1) if w]


def test_predict_thresholds_the_upsampled_probability(tmp_path, teacher_ckpt, monkeypatch, capsys):
    """The mask at the image's size (5x wider, 4x taller than the model's 32) is the bilinear upsampled
    probability thresholded, not the model-size mask enlarged with nearest-neighbour (staircase)."""
    size = runs.load_checkpoint(str(teacher_ckpt), "teacher")["args"]["size"]
    assert size == 32  # the fixture's: 160 = 5 x 32, 128 = 4 x 32
    disc = disc_probability(size)
    mask = np.asarray(Image.open(predict_hand_made(tmp_path, teacher_ckpt, monkeypatch, disc) / "a_mask.png"))
    assert mask.shape == (128, 160)
    ref = bilinear_by_hand(disc[0, 0], 128, 160)
    clear = np.abs(ref - 0.5) > 1e-6  # float32 against float64: only a tie could differ
    assert clear.mean() > 0.99
    assert np.array_equal(mask[clear], np.where(ref >= 0.5, 255, 0)[clear])
    nearest = np.asarray(Image.fromarray(np.where(disc[0, 0] >= 0.5, 255, 0).astype(np.uint8)).resize((160, 128),
                                                                                                      Image.NEAREST))
    assert (mask != nearest).sum() > 20
    assert all(w % 5 == 0 for w in row_widths(nearest))  # a staircase of 5-pixel steps
    assert any(w % 5 for w in row_widths(mask))          # edges between the model's pixels
    assert "warning" not in capsys.readouterr().err  # lesions found: no warning
    assert not (tmp_path / "out" / "a_probability.png").exists()  # only with --probability


def test_predict_probability_png(tmp_path, teacher_ckpt, monkeypatch):
    """--probability writes round(255 p) of the bilinear upsampled probability, at the image's size;
    a folder holding our outputs gives only its image again."""
    disc = disc_probability(32)
    out = predict_hand_made(tmp_path, teacher_ckpt, monkeypatch, disc, ["--probability"])
    png = Image.open(out / "a_probability.png")
    assert png.mode == "L" and png.size == (160, 128)
    got = np.asarray(png).astype(int)
    scaled = 255 * bilinear_by_hand(disc[0, 0], 128, 160)
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > 1e-3  # away from .5, where rounding could go either way
    assert clear.mean() > 0.99
    assert np.array_equal(got[clear], np.round(scaled).astype(int)[clear])
    assert np.abs(got - scaled).max() <= 0.5 + 1e-3
    assert got.min() == 0 and got.max() >= 250  # the whole 8-bit range is used
    (tmp_path / "in" / "a.png").rename(out / "a.png")
    written = predict.main(["--checkpoint", str(teacher_ckpt), str(out), "--out", str(out), "--device", "cpu"])
    assert [os.path.basename(p) for p, _ in written] == ["a.png"]  # a_mask, a_overlay, a_probability skipped


def test_predict_warns_when_every_mask_is_empty(tmp_path, teacher_ckpt, image_files, monkeypatch, capsys):
    monkeypatch.setattr(predict, "lesion_probability", lambda model, x: torch.zeros_like(x))
    written = predict.main(["--checkpoint", str(teacher_ckpt), str(image_files[0].parent), "--out", str(tmp_path / "p"),
                            "--device", "cpu"])
    assert len(written) == 3  # not an error
    assert not any(np.asarray(Image.open(m)).any() for _, m in written)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: all 3 masks are empty"), err
    for cause in ("phantom", "real scans", "--threshold", "modality", "size"):
        assert cause in err[0], cause


LOAD_IN_PLAIN_TORCH = """
import importlib.util, json, sys, torch
assert all(importlib.util.find_spec(m) is None for m in ("kd", "models", "predict", "data"))
meta = {"meta.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=meta)
x = torch.load(sys.argv[2], weights_only=True).float() / 255  # grey pixels resized to S x S, as meta.json says
x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
with torch.no_grad():
    probability = model(x)
torch.save({"probability": probability, "meta": json.loads(meta["meta.json"])}, sys.argv[3])
"""


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # newer torch: TorchScript still loads
@on_devices
def test_predict_export_loads_in_plain_torch(tmp_path, teacher_ckpt, image_files, capsys, device):
    """--export: a TorchScript file that torch alone, in a fresh process without this project, loads and
    runs; its lesion probability is the checkpoint's eager model's within 1e-4, on images preprocessed
    as its meta.json states."""
    path = tmp_path / "model.ts"
    assert predict.main(["--checkpoint", str(teacher_ckpt), "--export", str(path), "--device", device,
                         "--threshold", "0.4"]) == []  # no images: built-in phantom samples
    out = capsys.readouterr().out
    diff = float(re.search(r"checked on 4 built-in phantom images: largest difference .* model (\S+)", out).group(1))
    assert diff < 1e-4 and f"ms per frame on {device}" in out and "exported" in out
    ckpt = runs.load_checkpoint(str(teacher_ckpt), "teacher")
    size = ckpt["args"]["size"]
    grey = [Image.open(f).convert("L") for f in image_files]
    torch.save(torch.stack([torch.from_numpy(np.asarray(g.resize((size, size), Image.BILINEAR)).copy())[None]
                            for g in grey]), tmp_path / "pixels.pt")
    (tmp_path / "fresh").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", LOAD_IN_PLAIN_TORCH, str(path), str(tmp_path / "pixels.pt"),
                        str(tmp_path / "result.pt")], cwd=tmp_path / "fresh", env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True)  # tensors and plain values
    meta, got = result["meta"], result["probability"]
    assert meta["size"] == size and meta["threshold"] == 0.4 and meta["kind"] == "teacher"
    assert any("1e-6" in step and "std" in step for step in meta["preprocessing"])
    x = torch.cat([predict.preprocess(g, size, torch.device("cpu")) for g in grey])
    with torch.no_grad():
        ref = runs.build_model(ckpt)(x).softmax(dim=1)[:, 1:]
    assert got.shape == ref.shape == (3, 1, size, size)
    assert (got - ref).abs().max().item() < 1e-4
    assert ((ref - 0.4).abs() > 1e-3).float().mean() > 0.99 and ref.max() > 0.4  # a real, thresholdable output
    loaded = torch.jit.load(str(path))
    kinds = {m.original_name for m in loaded.modules()}
    assert "Conv2d" in kinds and "BatchNorm2d" not in kinds  # folded
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    predict.main(["--checkpoint", str(teacher_ckpt), str(image_files[0]), "--out", str(tmp_path / "p"),
                  "--export", str(path), "--device", device])
    assert "checked on 1 of the images given" in capsys.readouterr().out


def test_predict_export_bad_name_one_line_error(tmp_path, teacher_ckpt):
    rc, _, err = script("predict.py", "--checkpoint", str(teacher_ckpt), "--export", str(tmp_path / "model.onnx"))
    assert_one_line_error(rc, err, "--export", "model.onnx", ".ts")
    (tmp_path / "dir.ts").mkdir()
    with pytest.raises(data.UserError, match="--export .*is a folder"):
        predict.main(["--checkpoint", str(teacher_ckpt), "--export", str(tmp_path / "dir.ts")])
    assert not (tmp_path / "model.onnx").exists()


# ----------------------------------------------------------------------------- bench.py

@on_devices
def test_bench_results_positive_and_finite(capsys, device):
    results = bench.main(["--device", device, "--size", "32", "--teacher_width", "4", "--student_width", "2",
                          "--batch_size", "4", "--steps", "2", "--repeats", "2", "--warmup", "1", "--profile", "--methods"])
    out = capsys.readouterr().out
    assert f"profile of 20 fast single-frame calls on {device}" in out and "aten::" in out  # the profiler's table
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    parsed = {}
    for line in lines:
        m = RESULT.match(line)
        assert m, f"malformed line: {line!r}"
        parsed[m.group(1), m.group(2), m.group(3)] = float(m.group(4))
    for who in ("teacher", "student"):
        for metric in ("train_img_s", "train_tflops", "data_pct", "infer_ms_fp32", "infer_ms_fast", "fwd_gflop"):
            assert (who, device, metric) in parsed, f"no {metric} for the {who}"
    assert ("student", device, "infer_speedup_vs_teacher") in parsed
    for method in bench.METHODS:  # every method's distillation step, train_student.py's own
        assert ("student", device, f"step_ms_{method}") in parsed
    assert all(v > 0 for v in parsed.values()), parsed  # n/a (no value) is printed as such, not as a number
    if device == "cpu":
        assert ("teacher", "cpu", "train_peak_pct") not in parsed  # CPU peak unknown without --peak_tflops
    assert results[device]["teacher"]["train_img_s"] == pytest.approx(parsed["teacher", device, "train_img_s"], rel=1e-4)


def test_bench_bad_option_is_a_user_error():
    with pytest.raises(data.UserError, match="--device"):
        bench.main(["--device", "nonsense"])
    with pytest.raises(data.UserError, match="--steps"):
        bench.main(["--steps", "0"])


def test_conv_flops_hand_count():
    size = 10
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),             # out 8 x 10 x 10
                          nn.ConvTranspose2d(8, 4, 2, stride=2),     # in 8 x 10 x 10 -> out 4 x 20 x 20
                          nn.Conv2d(4, 8, 3, groups=2))              # out 8 x 18 x 18, 2 input channels each
    expected = 2 * (8 * 10 * 10 * 3 * 9 + 8 * 10 * 10 * 4 * 4 + 8 * 18 * 18 * 2 * 9)
    assert bench.conv_flops(model, size) == expected


@pytest.mark.parametrize("width,size", [(1, 16), (3, 32)])
def test_conv_flops_unet_formula(width, size):
    c = [width * 2 ** i for i in range(5)]
    r = [size // 2 ** i for i in range(5)]
    conv3 = lambda cin, cout, res: 2 * res * res * 9 * cin * cout
    flops = conv3(1, c[0], r[0]) + conv3(c[0], c[0], r[0])                               # inc
    flops += sum(conv3(c[i], c[i + 1], r[i + 1]) + conv3(c[i + 1], c[i + 1], r[i + 1]) for i in range(4))
    flops += sum(2 * c[i + 1] * r[i + 1] ** 2 * c[i] * 4                                   # transposed 2x2
                 + conv3(2 * c[i], c[i], r[i]) + conv3(c[i], c[i], r[i]) for i in range(4))
    flops += 2 * r[0] ** 2 * c[0] * 2                                                       # 1x1 head, 2 classes
    assert bench.conv_flops(UNet(width), size) == flops


# ----------------------------------------------------------------------------- the real BUSI

@needs_busi
def test_busi_counts_and_merged_masks():
    d = data.load_busi(BUSI_DIR, size=64)
    assert len(d) == 647 and d.labels.count("benign") == 437 and d.labels.count("malignant") == 210
    assert all(m.sum() > 0 for m in d.masks) and set(d.masks.unique().tolist()) == {0, 1}
    multi = 0
    for i, name in enumerate(d.names):  # recompute every multi-mask union independently
        cls, file = name.split("/")
        stem = file[:-4]
        files = [f for f in os.listdir(os.path.join(BUSI_DIR, cls)) if f.startswith(stem + "_mask")]
        if len(files) > 1:
            multi += 1
            union = np.zeros_like(np.asarray(Image.open(os.path.join(BUSI_DIR, cls, files[0])).convert("L")))
            for f in files:
                union |= np.asarray(Image.open(os.path.join(BUSI_DIR, cls, f)).convert("L"))
            want = np.asarray(Image.fromarray(union).resize((64, 64), Image.NEAREST)) > 127
            assert np.array_equal(d.masks[i, 0].numpy() == 1, want), name
    assert multi == 17
    assert len(data.load_busi(BUSI_DIR, ("benign", "malignant", "normal"), 32)) == 780


@needs_busi
def test_busi_duplicates_never_straddle_a_split():
    d = data.load_busi(BUSI_DIR, size=32)
    i, j = d.names.index("benign/benign (433).png"), d.names.index("malignant/malignant (145).png")
    assert d.hashes[i] == d.hashes[j]
    groups = {}
    for k, h in enumerate(d.hashes):
        groups.setdefault(h, []).append(k)
    dups = [g for g in groups.values() if len(g) > 1]
    for s in data.make_splits(d.labels, d.hashes, 3, 0, 0.15):
        for g in dups:
            assert any(set(g) <= set(s[p]) for p in ("train", "val", "test"))


@needs_busi
def test_committed_busi_split_is_the_one_made_here():
    """results/busi_split_seed0.json is what --data_seed 0 makes from BUSI: anyone can test on our parts."""
    d = data.load_busi(BUSI_DIR, size=32)
    made = data.make_splits(d.labels, d.hashes, 3, 0, 0.15)
    path = os.path.join(HERE, "results", "busi_split_seed0.json")
    assert runs.load_splits(path, d, 3) == made
    assert json.load(open(path))["images"] == 647


@needs_busi
def test_busi_near_copies_never_straddle_the_committed_split():
    """results/busi_split_neardup_seed0.json is what the scripts' defaults make from BUSI, and no two
    images whose thumbnails correlate above 0.95 sit in different parts of any fold."""
    d = data.load_busi(BUSI_DIR, size=32)
    path = os.path.join(HERE, "results", "busi_split_neardup_seed0.json")
    groups = data.near_duplicate_groups(d.thumbnails, d.hashes, 0.95)
    splits = runs.load_splits(path, d, 3)
    assert splits == data.make_splits(d.labels, groups, 3, 0, 0.15)
    r = np.corrcoef(d.thumbnails.flatten(1).double().numpy())
    close = [(i, j) for i, j in zip(*np.nonzero(r > 0.95)) if i < j]
    assert len(close) > 100  # BUSI's near-copies
    for s in splits:
        part = {i: p for p in ("train", "val", "test") for i in s[p]}
        assert all(part[i] == part[j] for i, j in close)


@needs_busi
def test_committed_benchmark_split_is_the_one_made_from_its_lists():
    """results/busi_benchmark_split_seed0.json: the public benchmark's three splits as --split reads them."""
    lists = os.path.join(os.path.dirname(os.path.abspath(BUSI_DIR)), "busi_benchmark_splits")
    if not os.path.isdir(lists):
        pytest.skip("the benchmark's name lists are not beside BUSI_DIR")
    d = data.load_busi(BUSI_DIR, size=32)
    committed = runs.load_splits(os.path.join(HERE, "results", "busi_benchmark_split_seed0.json"), d, 3)
    assert committed == runs.load_splits(lists, d, 3, 0.15, 0)
    assert [len(s["test"]) for s in committed] == [195] * 3
