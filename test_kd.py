"""Tests: python -m pytest -q   (the BUSI tests run when BUSI_DIR names a Dataset_BUSI_with_GT folder)."""
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import bench
import data
import kd
import losses
import predict
import study
import train_student
import train_teacher
from data import UserError
from models import Ensemble, Regressor, UNet, count_parameters

HERE = os.path.dirname(os.path.abspath(__file__))
BUSI_DIR = os.environ.get("BUSI_DIR", "")
needs_busi = pytest.mark.skipif(not os.path.isdir(os.path.join(BUSI_DIR, "benign")),
                                reason="set BUSI_DIR to a Dataset_BUSI_with_GT folder to run the BUSI tests")
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


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    ckpt = train_teacher.main(TINY + ["--width", "4", "--out", out])
    return out, ckpt


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
    width = lambda opts: next(o[1] for o in opts if o[0] == "width")
    n_teacher, n_student = count_parameters(UNet(width(train_teacher.OPTIONS))), count_parameters(UNet(width(train_student.OPTIONS)))
    assert 30.5e6 < n_teacher < 31.5e6
    assert 0.7e6 < n_student < 1e6
    assert 90e6 < count_parameters(UNet(112)) < 100e6  # the paper's teacher scale


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


# ----------------------------------------------------------------------------- metrics

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


def test_evaluate_keeps_every_image():
    d = data.make_phantom(7, 32, 0)
    r = kd.evaluate(UNet(2).eval(), d.images, d.masks, list(range(7)), torch.device("cpu"), None, batch_size=3)
    assert len(r["per_image_dice"]) == 7 and 0 <= r["dice"] <= 1 and r["loss"] > 0


# ----------------------------------------------------------------------------- data

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


def test_phantom_is_deterministic_binary_and_labelled():
    a, b = data.make_phantom(6, 48, seed=3), data.make_phantom(6, 48, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, data.make_phantom(6, 48, seed=4).images)
    assert set(a.masks.unique().tolist()) == {0, 1}
    assert all(m.sum() > 0 for m in a.masks)  # benign and malignant: every image holds a lesion
    n = data.make_phantom(4, 48, 0, ("benign", "normal"))
    assert n.labels == ["benign", "normal"] * 2 and n.masks[1].sum() == 0 and n.masks[0].sum() > 0


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


# ----------------------------------------------------------------------------- scripts, checkpoints

def test_checkpoint_round_trip_rebuilds_the_model(tiny_teacher):
    path, ckpt = tiny_teacher
    loaded = kd.load_checkpoint(path, "teacher")
    model = kd.build_model(loaded)
    again = kd.build_model(loaded)
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


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    d = data.make_phantom(16, 32, 0)
    model = UNet(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = kd.batch(d.images, d.masks, torch.arange(16))
    first = None
    for _ in range(15):
        loss = losses.supervised_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("pathway,loss,extra", [("logits", "kld", []), ("hidden", "mse", []), ("hidden_regressor", "kld", []),
                                               ("none", "kld", []), ("hidden", "kld", ["--teacher_flip"])])
def test_student_runs_on_its_teachers_split(tiny_teacher, tmp_path, pathway, loss, extra):
    path, t = tiny_teacher
    s = train_student.main(["--teacher", path, "--pathway", pathway, "--loss", loss, "--width", "2",
                            "--epochs", "1", "--batch_size", "4", "--out", str(tmp_path / "s.pt")] + extra)
    assert s["split"] == t["split"] and s["kind"] == "student"
    assert not any(k.startswith("0.") for k in s["model"])  # the regressor is not saved with the student
    assert s["parameters"] == count_parameters(UNet(2)) and s["teacher_parameters"] == t["parameters"]
    assert s["teacher_test"]["per_image_dice"] == pytest.approx(t["test"]["per_image_dice"])


def test_student_refuses_another_split(tiny_teacher, tmp_path):
    path, _ = tiny_teacher
    ckpt = torch.load(path, weights_only=True)
    ckpt["split"]["test"][0], ckpt["split"]["train"][0] = ckpt["split"]["train"][0], ckpt["split"]["test"][0]
    torch.save(ckpt, tmp_path / "leaky.pt")
    rc, _, err = script("train_student.py", "--teacher", str(tmp_path / "leaky.pt"), cwd=str(tmp_path))
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
                            "--out", str(tmp_path / "s.pt")])
    assert s["teacher_parameters"] == t["parameters"] + t1["parameters"] and s["split"] == t["split"]
    ens_loss = s["teacher_test"]["loss"]  # the ensemble is what is evaluated as the teacher, not one member
    assert ens_loss != pytest.approx(t["test"]["loss"]) and ens_loss != pytest.approx(t1["test"]["loss"])
    rc, _, err = script("train_student.py", "--teacher", f"{path},{other}", "--pathway", "hidden_regressor",
                        cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--pathway hidden_regressor", "ensemble", "--pathway logits")
    leaky = torch.load(other, weights_only=True)
    leaky["split"]["test"][0], leaky["split"]["train"][0] = leaky["split"]["train"][0], leaky["split"]["test"][0]
    torch.save(leaky, tmp_path / "leaky.pt")
    rc, _, err = script("train_student.py", "--teacher", f"{path},{tmp_path / 'leaky.pt'}", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "leaky.pt", "split differs")


def test_nan_loss_stops_and_keeps_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = train_teacher.supervised_loss

    def flaky(*a, **k):  # fine through epoch 1 (3 steps of 4 images), NaN afterwards
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train_teacher, "supervised_loss", flaky)
    out = str(tmp_path / "t.pt")
    with pytest.raises(SystemExit) as e:
        kd.run(lambda: train_teacher.main(TINY + ["--width", "2", "--epochs", "5", "--out", out]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training loss became nan at epoch 2") and "best checkpoint (epoch 1) kept" in err
    assert kd.load_checkpoint(out, "teacher")["epoch"] == 1


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
    assert kd.load_checkpoint(out, "teacher")["test"]["dice"] == ckpt["test"]["dice"]


def test_bad_options_and_help(tiny_teacher, tmp_path):
    rc, out, err = script("train_teacher.py", "--help")
    assert rc == 0 and "--aug" in out and "Eq." not in err
    rc, _, err = script("train_teacher.py", "--data", "phantom", "--folds", "3", "--fold", "3", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--fold 3")
    rc, _, err = script("train_teacher.py", "--data", "phantom", "--out", "model.bin", cwd=str(tmp_path))
    assert_one_line_error(rc, err, "--out model.bin")
    for name, args, words in (("train_teacher.py", ["--data", "phantom", "--size", "8"], ["--size 8", "at least 16"]),
                              ("train_teacher.py", ["--data", "phantom", "--phantom_count", "4", "--folds", "3"],
                               ["too few", "--folds"]),
                              ("train_student.py", ["--teacher", tiny_teacher[0], "--alpha", "2"], ["--alpha 2.0"])):
        rc, _, err = script(name, *args, cwd=str(tmp_path))
        assert_one_line_error(rc, err, *words)


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


# ----------------------------------------------------------------------------- bench.py and predict.py

RESULT = re.compile(r"^RESULT model=(\w+) device=(\w+) metric=(\w+) value=(\S+)$")


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


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny teacher trained just enough (3 s) to find lesions: after one epoch its masks are empty."""
    path = tmp_path_factory.mktemp("ckpt") / "t.pt"
    train_teacher.main(["--data", "phantom", "--phantom_count", "24", "--size", "32", "--width", "4", "--epochs", "8",
                        "--lr", "3e-3", "--aug", "none", "--batch_size", "4", "--out", str(path)])
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


# ----------------------------------------------------------------------------- bench.py

def test_bench_results_positive_and_finite(capsys):
    results = bench.main(["--device", "cpu", "--size", "32", "--teacher_width", "4", "--student_width", "2",
                          "--batch_size", "4", "--steps", "2", "--repeats", "2", "--warmup", "1", "--profile"])
    out = capsys.readouterr().out
    assert "profile of 20 fast single-frame calls on cpu" in out and "aten::" in out  # the profiler's table
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    parsed = {}
    for line in lines:
        m = RESULT.match(line)
        assert m, f"malformed line: {line!r}"
        parsed[m.group(1), m.group(2), m.group(3)] = float(m.group(4))
    for who in ("teacher", "student"):
        for metric in ("train_img_s", "train_tflops", "data_pct", "infer_ms_fp32", "infer_ms_fast", "fwd_gflop"):
            assert (who, "cpu", metric) in parsed, f"no {metric} for the {who}"
    assert ("student", "cpu", "infer_speedup_vs_teacher") in parsed
    assert all(math.isfinite(v) and v > 0 for v in parsed.values()), parsed
    assert ("teacher", "cpu", "train_peak_pct") not in parsed  # CPU peak unknown without --peak_tflops
    assert results["cpu"]["teacher"]["train_img_s"] == pytest.approx(parsed["teacher", "cpu", "train_img_s"], rel=1e-4)


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


# ----------------------------------------------------------------------------- fast inference

def test_fused_fp32_equals_plain():
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet(4))
    fused = predict.fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = data.normalize(data.make_phantom(4, 64, seed=2).images.float() / 255)
    with torch.no_grad():
        ref = model(x)
    fast = predict.fast_model(model, torch.device("cpu"), None)
    with torch.no_grad():
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.equal(predict.lesion_probability(fast, x) >= 0.5, ref.softmax(1)[:, 1:] >= 0.5)


def test_fast_bf16_matches_fp32():
    """Random weights: the lesion probability of the bf16 fast form is fp32's up to bf16 rounding."""
    torch.manual_seed(0)
    model = randomise_batchnorm(UNet(4))
    x = data.normalize(data.make_phantom(4, 64, seed=3).images.float() / 255)
    with torch.no_grad():
        ref = model(x).softmax(1)[:, 1:]
    fast = predict.fast_model(model, torch.device("cpu"), torch.bfloat16)
    assert next(fast.parameters()).dtype == torch.bfloat16
    prob = predict.lesion_probability(fast, x.contiguous(memory_format=torch.channels_last))
    assert prob.dtype == torch.float32 and prob.shape == ref.shape
    assert (prob - ref).abs().max().item() < 0.02  # bf16 keeps about 3 significant digits


def test_fast_bf16_masks_match_fp32_trained(teacher_ckpt):
    """A trained model: the bf16 fast form's masks are the fp32 model's (Dice of one against the other)."""
    model = kd.build_model(kd.load_checkpoint(str(teacher_ckpt), "teacher"))
    x = data.normalize(data.make_phantom(16, 32, seed=5).images.float() / 255)
    with torch.no_grad():
        ref = model(x).softmax(1)[:, 1:] >= 0.5
    fast = predict.fast_model(model, torch.device("cpu"), torch.bfloat16)
    pred = predict.lesion_probability(fast, x.contiguous(memory_format=torch.channels_last)) >= 0.5
    assert ref.float().mean() > 0.02  # it does find lesions
    dice, _ = kd.dice_iou(pred, ref)
    assert dice.mean().item() > 0.97
    assert (pred == ref).float().mean().item() > 0.995


# ----------------------------------------------------------------------------- predict.py

def test_preprocessing_matches_training(tmp_path, image_files):
    """predict.preprocess gives the very tensor training gives for the same file (load_folder + kd.batch)."""
    (tmp_path / "scans" / "masks").mkdir()
    (tmp_path / "scans" / "images").mkdir()
    im = Image.open(image_files[0])
    im.save(tmp_path / "scans" / "images" / "a.png")
    Image.new("L", im.size).save(tmp_path / "scans" / "masks" / "a.png")
    ds = data.load_folder(str(tmp_path / "scans"), size=32)
    x_train, _ = kd.batch(ds.images, ds.masks, torch.tensor([0]))
    x_pred = predict.preprocess(data._open(image_files[0], "L"), 32, torch.device("cpu"))
    assert x_pred.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_pred, x_train)


def test_predict_writes_masks_and_overlays(tmp_path, teacher_ckpt, image_files, capsys):
    out = tmp_path / "pred"
    written = predict.main(["--checkpoint", str(teacher_ckpt), str(image_files[0]), str(image_files[1].parent),
                            "--out", str(out), "--threshold", "0.3"])
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
    with pytest.raises(data.UserError, match="not a checkpoint of this project|file not found"):
        predict.main(["--checkpoint", str(tmp_path / "nope.pt"), str(image_files[0])])


def test_predict_corrupt_png_one_line_error(tmp_path, teacher_ckpt, image_files):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"these are not the bytes of a PNG file")
    r = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(teacher_ckpt), str(image_files[0]), str(bad),
                        "--out", str(tmp_path / "p")], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(predict.__file__)))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "x.png" in err[0], r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- study.py

STUDY_TINY = ["--data", "phantom", "--phantom_count", "24", "--size", "32", "--teacher_width", "4",
        "--student_width", "2", "--epochs", "1", "--batch_size", "8", "--folds", "2",
        "--device", "cpu", "--amp", "off", "--pictures", "2"]


# ----------------------------------------------------------------------------- the paired test

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
    assert 0 < p <= 1 and p == study.paired_permutation_test(a, b, seed=3)  # fixed seed: repeatable


def test_summary_pools_folds_and_pairs_images_by_name():
    def rec(row, fold, dice):
        names = [f"f{fold}/img{i}" for i in range(len(dice))]
        return dict(row=row, fold=fold, dice=float(np.mean(dice)), iou=0.5, per_image_dice=dice, names=names,
                    parameters=10, train_seconds=2.0)
    rng = np.random.default_rng(0)
    t = {f: list(rng.random(12)) for f in (0, 1)}
    records = {("Teacher", f): rec("Teacher", f, t[f]) for f in (0, 1)}
    records.update({("Student", f): rec("Student", f, [x - 0.2 for x in t[f]]) for f in (0, 1)})
    summary, gap = study.summarise(records, ["Teacher", "Student"], [0, 1], n_perm=999, seed=0)
    s = summary["Student"]
    assert s["dice_mean"] == pytest.approx(np.mean(t[0] + t[1]) - 0.2)
    assert s["dice_std"] == pytest.approx(np.std([np.mean(t[0]), np.mean(t[1])], ddof=1))
    assert s["n_images"] == 24 and s["pairs_vs_teacher"] == 24 and s["train_seconds"] == 4.0
    assert s["p_vs_teacher"] == 1 / 1000  # 24 pairs, every difference -0.2: nothing random reaches it
    assert summary["Teacher"]["p_vs_teacher"] is None
    assert gap == {0: pytest.approx(0.2), 1: pytest.approx(0.2)}


# ----------------------------------------------------------------------------- the study, end to end

def test_study_end_to_end_resumes_and_draws(tmp_path):
    out = str(tmp_path / "study")
    res = study.main(STUDY_TINY + ["--out", out])
    assert len(res["ran"]) == 2 * len(study.ROWS) == 2 * 15  # 14 rows of Table 4 + the weak teacher, 2 folds
    table = open(os.path.join(out, "table.md")).read()
    for row in study.ROWS:
        assert f"| {row} |" in table or f"| {row}* |" in table
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    ps = [s[k] for s in rows.values() for k in ("p_vs_teacher", "p_vs_student") if s[k] is not None]
    assert len(ps) == 2 * 15 - 2 and all(0 <= p <= 1 for p in ps)  # 24 pairs each: the Monte-Carlo test
    run = json.load(open(os.path.join(out, "fold0", "L_KLD_WAug.json")))
    assert run["argv"][run["argv"].index("--teacher") + 1].endswith("Teacher_WAug.pt")
    assert len(run["per_image_dice"]) == len(run["names"]) == 12

    # resumed: nothing re-runs, no JSON is rewritten, the table is the same
    jsons = glob.glob(os.path.join(out, "fold*", "*.json"))
    mtimes = {p: os.path.getmtime(p) for p in jsons}
    again = study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])
    assert again["ran"] == [] and again["table"] == res["table"]
    assert {p: os.path.getmtime(p) for p in jsons} == mtimes
    # a run killed before its JSON was written runs again, and only it
    os.remove(os.path.join(out, "fold0", "H_MSE.json"))
    assert study.main(STUDY_TINY + ["--out", out, "--pictures", "0"])["ran"] == [("H_MSE", 0)]
    # other options in the same folder: refused, not mixed in
    with pytest.raises(UserError, match="--epochs"):
        study.main(STUDY_TINY + ["--out", out, "--epochs", "2"])

    tile = max(32, study.TILE_MIN)  # 5 columns, 2 images, a title line
    size = (5 * (tile + study.PAD) + study.PAD, study.TITLE + 2 * (tile + study.PAD) + study.PAD)
    assert Image.open(os.path.join(out, "pictures.png")).size == size


@pytest.mark.parametrize("words, message", [(["--rows", "L_XYZ"], "L_XYZ"), (["--fold_list", "5"], "5"),
                                            (["--folds", "1"], "at least 2")])
def test_bad_options_are_one_line_errors(tmp_path, words, message):
    with pytest.raises(UserError, match=message):
        study.main(STUDY_TINY + ["--out", str(tmp_path)] + words)
