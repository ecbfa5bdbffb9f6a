"""Tests of study.py (Table 4 reproduction): the permutation test against cases worked by hand,
the table's arithmetic on made-up runs, and one tiny study end to end on the phantom, resumed.
    python -m pytest test_study.py -q        # about half a minute on 2 CPU cores
"""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

import study
from data import UserError

TINY = ["--data", "phantom", "--phantom_count", "24", "--size", "32", "--teacher_width", "4",
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
    res = study.main(TINY + ["--out", out])
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
    again = study.main(TINY + ["--out", out, "--pictures", "0"])
    assert again["ran"] == [] and again["table"] == res["table"]
    assert {p: os.path.getmtime(p) for p in jsons} == mtimes
    # a run killed before its JSON was written runs again, and only it
    os.remove(os.path.join(out, "fold0", "H_MSE.json"))
    assert study.main(TINY + ["--out", out, "--pictures", "0"])["ran"] == [("H_MSE", 0)]
    # other options in the same folder: refused, not mixed in
    with pytest.raises(UserError, match="--epochs"):
        study.main(TINY + ["--out", out, "--epochs", "2"])

    tile = max(32, study.TILE_MIN)  # 5 columns, 2 images, a title line
    size = (5 * (tile + study.PAD) + study.PAD, study.TITLE + 2 * (tile + study.PAD) + study.PAD)
    assert Image.open(os.path.join(out, "pictures.png")).size == size


@pytest.mark.parametrize("words, message", [(["--rows", "L_XYZ"], "L_XYZ"), (["--fold_list", "5"], "5"),
                                            (["--folds", "1"], "at least 2")])
def test_bad_options_are_one_line_errors(tmp_path, words, message):
    with pytest.raises(UserError, match=message):
        study.main(TINY + ["--out", str(tmp_path)] + words)
