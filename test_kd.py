"""Tests: python -m pytest -q test_kd.py   (BUSI tests run when BUSI_DIR names the dataset folder)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import kd
import losses
import train_student
import train_teacher
from models import Regressor, UNet, count_parameters

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
    model, dev = UNet(4), torch.device("cpu")
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
