"""Reference values for tests/metrics.rs, computed independently of vigil.

How the fixture was made:
    python3 -m venv venv && venv/bin/pip install scikit-learn scipy numpy
    venv/bin/python tests/reference/make_reference.py > tests/reference/metrics_reference.json
with Python 3.11.7, numpy 2.4.6, scipy 1.17.1, scikit-learn 1.9.1 (printed into the JSON's "made_with").

Image level: sklearn.metrics roc_auc_score, roc_curve (default drop_intermediate=True) and
precision_recall_curve (F1 = 2PR/(P+R); on equal F1 the lowest threshold, vigil's choice).
Pixel level: roc_auc_score over all pixels, and AUPRO as in the MVTec AD evaluation code
(mvtec_ad_evaluation: pro_curve_util.compute_pro and generic_util.trapezoid): connected components
by scipy.ndimage.label with a 3x3 structure (8-connectivity), every distinct score as a threshold,
trapezoidal integration up to the FPR limit with interpolation there, divided by the limit. A
second, naive implementation loops over the thresholds one by one; the script checks both agree
to 1e-12 before writing anything. Inputs are float32 and are written out too, so the Rust test
needs no Python.
"""
import json
import sys
from bisect import bisect

import numpy as np
import scipy
import sklearn
from scipy.ndimage import label
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

STRUCTURE = np.ones((3, 3), dtype=int)
LIMITS = [0.3, 0.05, 0.01, 1.0]


def f1_max(scores, labels):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.where(denominator > 0, 2 * precision * recall / np.where(denominator > 0, denominator, 1), 0)
    best = f1.max()
    # thresholds ascend: the first index within rounding of the best is the lowest threshold
    index = int(np.flatnonzero(f1 >= best - 1e-12)[0])
    return float(f1[index]), float(thresholds[index])


def image_case(name, scores, labels):
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert np.isinf(thresholds[0])
    best_f1, best_threshold = f1_max(scores, labels)
    return {
        "name": name,
        "scores": [float(s) for s in scores],
        "labels": [bool(l) for l in labels],
        "auroc": float(roc_auc_score(labels, scores)),
        "roc_fpr": [float(v) for v in fpr[1:]],
        "roc_tpr": [float(v) for v in tpr[1:]],
        "roc_thresholds": [float(v) for v in thresholds[1:]],
        "f1_max": best_f1,
        "f1_threshold": best_threshold,
    }


def trapezoid(x, y, x_max):
    """generic_util.trapezoid of the MVTec AD evaluation code (finite inputs)."""
    x, y = np.asarray(x), np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def pro_curve_sorted(maps, masks):
    """pro_curve_util.compute_pro of the MVTec AD evaluation code."""
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i, mask in enumerate(masks):
        labeled, n = label(mask, STRUCTURE)
        num_regions += n
        ok = labeled == 0
        num_ok += ok.sum()
        fp_changes[i, ok] = 1
        for k in range(n):
            region = labeled == (k + 1)
            pro_changes[i, region] = 1.0 / region.sum()
    scores = maps.ravel()
    order = np.argsort(scores, kind="stable")[::-1]
    scores = scores[order]
    fps = np.cumsum(fp_changes.ravel()[order]) / num_ok
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores) != 0, True)
    fps, pros = np.clip(fps[keep], 0, 1), np.clip(pros[keep], 0, 1)
    return np.concatenate(([0.0], fps, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def pro_curve_naive(maps, masks):
    """One threshold at a time, straight from the definition."""
    regions, ok = [], []
    for i, mask in enumerate(masks):
        labeled, n = label(mask, STRUCTURE)
        ok.append(maps[i][labeled == 0])
        regions += [maps[i][labeled == k + 1] for k in range(n)]
    ok = np.concatenate(ok)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(ok >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fprs), np.array(pros)


def aupro(curve, limit):
    fprs, pros = curve
    return float(trapezoid(fprs, pros, limit) / limit)


def pixel_case(name, maps, masks):
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.uint8)
    exact, naive = pro_curve_sorted(maps, masks), pro_curve_naive(maps, masks)
    values = []
    for limit in LIMITS:
        a, b = aupro(exact, limit), aupro(naive, limit)
        assert abs(a - b) < 1e-12, (name, limit, a, b)
        values.append([limit, a])
    _, height, width = maps.shape
    return {
        "name": name,
        "height": height,
        "width": width,
        "maps": [[float(v) for v in m.ravel()] for m in maps],
        "masks": [[int(v) for v in m.ravel()] for m in masks],
        "pixel_auroc": float(roc_auc_score(masks.ravel() != 0, maps.ravel())),
        "aupro": values,
    }


def random_masks(rng, count, height, width):
    masks = np.zeros((count, height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for mask in masks[1:]:  # the first image is defect-free
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(3)
            cy, cx = rng.integers(height), rng.integers(width)
            if kind == 0:  # disc
                r = rng.uniform(1, height / 5)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
            elif kind == 1:  # rectangle
                mask[cy : cy + rng.integers(1, 5), cx : cx + rng.integers(1, 6)] = 1
            else:  # diagonal scratch: joined only through corners
                for k in range(rng.integers(2, 6)):
                    if cy + k < height and cx + k < width:
                        mask[cy + k, cx + k] = 1
    return masks


def random_maps(rng, masks, separation, levels=None):
    maps = rng.normal(size=masks.shape) + separation * masks
    # smooth a little, like real anomaly maps
    maps = (maps + np.roll(maps, 1, 1) + np.roll(maps, 1, 2)) / 3
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32)


def main():
    rng = np.random.default_rng(20240611)
    image_cases = []
    labels = rng.random(200) < 0.4
    image_cases.append(image_case("continuous_200", rng.normal(size=200) + 1.2 * labels, labels))
    labels = rng.random(300) < 0.5
    image_cases.append(image_case("ties_300", np.round(rng.normal(size=300) + 0.8 * labels, 1), labels))
    labels = rng.random(120) < 0.3
    image_cases.append(image_case("five_levels_120", rng.integers(0, 5, 120) + 1.0 * labels, labels))
    labels = np.zeros(500, dtype=bool)
    labels[rng.choice(500, 5, replace=False)] = True
    image_cases.append(image_case("imbalanced_500", rng.normal(size=500) + 2.0 * labels, labels))
    image_cases.append(image_case("small_7", rng.random(7), [1, 0, 0, 1, 0, 1, 0]))
    labels = rng.random(50) < 0.5
    image_cases.append(image_case("separable_50", rng.random(50) + 2.0 * labels, labels))
    image_cases.append(image_case("negative_scores_40", -rng.exponential(size=40), rng.random(40) < 0.5))

    pixel_cases = []
    masks = random_masks(rng, 4, 16, 16)
    pixel_cases.append(pixel_case("continuous_4x16x16", random_maps(rng, masks, 1.5), masks))
    masks = random_masks(rng, 5, 12, 20)
    pixel_cases.append(pixel_case("ties_5x12x20", random_maps(rng, masks, 1.0, levels=4), masks))
    masks = random_masks(rng, 6, 24, 24)
    pixel_cases.append(pixel_case("weak_6x24x24", random_maps(rng, masks, 0.4), masks))
    masks = random_masks(rng, 3, 8, 8)
    pixel_cases.append(pixel_case("coarse_3x8x8", random_maps(rng, masks, 2.0, levels=2), masks))

    made_with = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }
    json.dump({"made_with": made_with, "image_cases": image_cases, "pixel_cases": pixel_cases}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
