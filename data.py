"""Data: the BUSI loader, a generic images/masks loader, a synthetic phantom, splits, augmentation.

Every source gives the same thing, a `Dataset`: images and masks decoded and resized once, kept in
memory as uint8 tensors (N, 1, S, S) (masks hold 0/1, never 0/255), plus per image a name, a class
and a hash of its pixels. Training then indexes whole batches out of these tensors on the device
and augments them there with torch ops: no DataLoader, no worker processes, no per-image Python.
"""
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BUSI_CLASSES = ("benign", "malignant", "normal")
IGNORED_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
THUMB = 32  # side of the thumbnails that near-copies are found on


class UserError(Exception):
    """Bad input from the user (a file or an option). The scripts print it as one line, exit 2."""


@dataclass
class Dataset:
    images: torch.Tensor  # (N, 1, S, S) uint8 grey levels
    masks: torch.Tensor   # (N, 1, S, S) uint8 in {0, 1}, lesion = 1
    names: list           # e.g. "benign/benign (12).png": what a split stores
    labels: list          # class name per image: what splits stratify by
    hashes: list          # sha1 of the decoded full-size pixels: identical images share one
    thumbnails: torch.Tensor  # (N, 32, 32) uint8: each image shrunk from full size, to find near-copies
    source: str           # "busi", "folder" or "phantom"
    merged: int = 0       # images whose mask is the union of several mask files

    def __len__(self):
        return len(self.names)

    def fingerprint(self):
        """One hash of every name, image and mask (as loaded, at this size): two datasets with equal
        fingerprints are equal, and re-annotated masks change it."""
        h = hashlib.sha1("".join(n + p for n, p in zip(self.names, self.hashes)).encode())
        h.update(self.masks.contiguous().numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- reading files

def open_image(path, mode):
    """Decode a file into a PIL image of `mode`, or raise a one-line UserError naming it."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16- or 32-bit grey: convert() would clip
                a = np.asarray(im, dtype=np.float64)  # at 255 (or round floats in [0, 1] to 0 or 1); scaled by
                top = a.max()  # its own maximum instead: images are normalised per image; 0/1 masks stay 0/1
                a = a * 255 / top if top > 0 and (im.mode == "F" or top > 255) else a
                im = Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8))
            return im.convert(mode)  # RGB, RGBA, 1-bit and palette files all become grey ("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read this image ({e}); re-download or remove it") from None


def _binarise(mask):
    """uint8 array -> {0, 1}. Threshold at half the file's maximum, so 0/255 and 0/1 files both work."""
    return (mask > mask.max() // 2).astype(np.uint8)  # all-zero masks stay all zero


def _load_pair(image_path, mask_paths, size):
    """Image and the union of its masks, resized to size x size: (image, mask, pixel hash, thumbnail)."""
    image = open_image(image_path, "L")
    mask = np.zeros((image.height, image.width), np.uint8)
    for mp in mask_paths:
        m = open_image(mp, "L")
        if m.size != image.size:
            raise UserError(f"{mp}: mask is {m.width}x{m.height} but its image {os.path.basename(image_path)} "
                            f"is {image.width}x{image.height}; fix or remove the pair")
        mask |= _binarise(np.asarray(m))  # an image with several lesions: the union of its masks
    pixels = np.asarray(image)
    digest = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    # The paper resizes to a square (224 x 224) without keeping the aspect ratio; so do we.
    thumbnail = _thumbnail(image)
    image = np.asarray(image.resize((size, size), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)) // 255
    return image, mask, digest, thumbnail


def _thumbnail(image):
    """A grey PIL image shrunk to 32 x 32 (averaging, whatever its size): what near-copies share."""
    return np.asarray(image.resize((THUMB, THUMB), Image.BILINEAR, reducing_gap=None))


def _stack(pairs, names, labels, source, merged=0):
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    thumbnails = torch.from_numpy(np.stack([p[3] for p in pairs]))
    return Dataset(images, masks, names, labels, [p[2] for p in pairs], thumbnails, source, merged)


def listdir(folder):
    """Files of a folder, without the clutter operating systems leave (.DS_Store, ._* ...)."""
    return sorted(f for f in os.listdir(folder) if f not in IGNORED_FILES and not f.startswith("._")
                  and os.path.isfile(os.path.join(folder, f)))


def load_busi(root, classes=("benign", "malignant"), size=224):
    """BUSI in its original layout: root/{benign,malignant,normal}/ with "benign (12).png",
    its mask "benign (12)_mask.png" and, for extra lesions, "benign (12)_mask_1.png", ...

    The lesion mask of an image is the union of all its mask files. `normal` images (empty masks)
    are opt-in: the common BUSI protocol, and ours, segments benign + malignant (647 images).
    """
    pairs, names, labels, all_masks = [], [], [], []
    for cls in classes:
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: class folder not found; is {root} the Dataset_BUSI_with_GT folder?")
        pngs = [f for f in listdir(folder) if f.lower().endswith(".png")]
        stems = [f[:-4] for f in pngs if "_mask" not in f]
        if not stems:
            raise UserError(f"{folder}: no images in this class folder; re-download BUSI or drop the class")
        masks = {s: [] for s in stems}
        all_masks += masks.values()
        for f in pngs:
            if "_mask" in f:
                stem = f[:f.index("_mask")]
                if stem not in masks:
                    raise UserError(f"{os.path.join(folder, f)}: mask without an image {stem}.png; "
                                    f"restore the image or remove the mask")
                masks[stem].append(os.path.join(folder, f))
        for s in sorted(stems, key=_natural):
            if not masks[s]:
                raise UserError(f"{os.path.join(folder, s + '.png')}: image has no mask {s}_mask.png; "
                                f"add it or remove the image")
            pairs.append(_load_pair(os.path.join(folder, s + ".png"), sorted(masks[s]), size))
            names.append(f"{cls}/{s}.png")
            labels.append(cls)
    return _stack(pairs, names, labels, "busi", merged=sum(len(m) > 1 for m in all_masks))


def _natural(stem):
    """Sort "benign (2)" before "benign (10)"."""
    digits = "".join(c for c in stem if c.isdigit())
    return (stem.split("(")[0], int(digits) if digits else -1, stem)


FOLDER_LAYOUTS = [("images", "masks"), ("original", "GT")]  # (images, masks) folder names, any letter case


def _subfolder(root, name):
    """root/name if root holds a folder of that name in any letter case (GT, gt, Gt), else None."""
    found = [d for d in os.listdir(root) if d.lower() == name.lower() and os.path.isdir(os.path.join(root, d))]
    return os.path.join(root, found[0]) if found else None


def folder_layout(root):
    """(images folder, masks folder) of `root` in one of FOLDER_LAYOUTS, or None."""
    for images, masks in FOLDER_LAYOUTS:
        pair = _subfolder(root, images), _subfolder(root, masks)
        if all(pair):
            return pair
    return None


def load_folder(root, size=224):
    """Images and masks in two folders: root/images/ + root/masks/ (most users' own data), or
    root/original/ + root/GT/ (the UDIAT "Dataset B" of the main paper, as it is distributed);
    folder names in any letter case (Images/ + Masks/, Original/ + gt/ ...), the pairs tried in
    that order (FOLDER_LAYOUTS). Every file of the images folder is an image (any format Pillow
    reads), NAME.ext matched to the first of the masks NAME.*, NAME_mask.*, NAME_GT.* (any
    extension, names compared in any letter case); mask files without an image are ignored. Masks
    may be 0/255, 0/1, grey, RGB or 1-bit. Images are stratified by whether their mask holds a lesion."""
    layout = folder_layout(root) if os.path.isdir(root) else None
    if layout is None:
        raise UserError(f"{root}: no images/ + masks/ or original/ + GT/ folders in it (any letter case)")
    img_dir, mask_dir = layout
    mask_files = {os.path.splitext(f)[0].lower(): f for f in listdir(mask_dir)}
    pairs, names, labels = [], [], []
    for f in listdir(img_dir):
        stem = os.path.splitext(f)[0]
        candidates = [stem.lower() + suffix for suffix in ("", "_mask", "_gt")]
        m = next((mask_files[k] for k in candidates if k in mask_files), None)
        if m is None:
            raise UserError(f"{os.path.join(img_dir, f)}: no mask named {stem}.*, {stem}_mask.* or {stem}_GT.* "
                            f"in {mask_dir}; add it or remove the image")
        pairs.append(_load_pair(os.path.join(img_dir, f), [os.path.join(mask_dir, m)], size))
        names.append(f)
        labels.append("lesion" if pairs[-1][1].any() else "empty")
    if not pairs:
        raise UserError(f"{img_dir}: no images in this folder")
    return _stack(pairs, names, labels, "folder")


def load_data(path, classes=("benign", "malignant"), size=224, phantom_count=240, seed=0):
    """`path` is "phantom" (the built-in phantom), or a folder, recognised by the names of the
    folders directly inside it, in this order:
      1. a folder benign/, malignant/ or normal/ (BUSI's own lower-case names) -> load_busi;
      2. images/ + masks/, else original/ + GT/ (UDIAT Dataset B as distributed), both folders
         of a pair present, names in any letter case (Images/, GT/, gt/ ...) -> load_folder.
    Anything else is a one-line UserError that lists these layouts."""
    if path == "phantom":
        return make_phantom(phantom_count, size, seed, classes)
    if not os.path.isdir(path):
        raise UserError(f"--data {path}: folder not found; give the Dataset_BUSI_with_GT folder, "
                        f"a folder with images/ and masks/ (or original/ and GT/), or 'phantom'")
    if any(os.path.isdir(os.path.join(path, c)) for c in BUSI_CLASSES):
        return load_busi(path, classes, size)
    if folder_layout(path):
        return load_folder(path, size)
    raise UserError(f"--data {path}: none of the layouts recognised inside it: BUSI's (benign/ malignant/ normal/), "
                    f"images/ + masks/, or original/ + GT/ (these two in any letter case)")


# ----------------------------------------------------------------------------- the phantom

def _smooth_noise(g, size, cells):
    """Random field varying over about `cells` cells across the image, values in about [-1, 1]."""
    return F.interpolate(torch.randn(1, 1, cells, cells, generator=g), size=(size, size),
                         mode="bicubic", align_corners=False)[0, 0].clamp(-2, 2) / 2


def _blob(x, y, cx, cy, r, aspect, harmonics, angle=0.0):
    """Inside of an outline r * (1 + sum_k a_k cos(k theta + phi_k)) around (cx, cy), aspect =
    width / height, tilted by `angle`: a bool map. harmonics: [(k, a_k, phi_k), ...]."""
    dx, dy = x - cx, y - cy
    dx, dy = dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)
    theta = torch.atan2(dy, dx / aspect)
    edge = torch.ones_like(theta)
    for k, a, phi in harmonics:
        edge = edge + a * torch.cos(k * theta + phi)
    return torch.sqrt((dx / aspect) ** 2 + dy ** 2) < r * edge.clamp(min=0.3)


def _lesion(u, x, y, cls):
    """One lesion's mask, and how echogenic it is. Radii are log-uniform, as lesion sizes in BUSI
    are skewed to the small (areas from about 0.3% to 30% of the image); one lesion in 8 is cut by
    a side edge of the image (in BUSI about 1 in 25 touches a side; more here, so that a model
    meets the case), the others lie inside it, below the skin. benign: oval, wider than tall
    ("parallel" to the skin), smooth or gently lobulated; malignant: irregular, microlobulated and spiculated
    (many sharp harmonics), often taller than wide. Most are hypoechoic (dark); one in five is
    isoechoic, barely darker than the tissue around it."""
    r = math.exp(u(math.log(0.03), math.log(0.3)))
    aspect = u(1.2, 2.0) if cls == "benign" else u(0.7, 1.3)
    w, h = min(0.5, 1.1 * r * aspect), 1.1 * r  # about half the lesion's width and height
    side = u(0, 1)  # below 1/16: cut by the left edge, above 15/16: by the right one; else inside
    cx = u(0.2, 0.9) * w if side < 1 / 16 else 1 - u(0.2, 0.9) * w if side > 15 / 16 else u(w, 1 - w)
    cy = u(max(0.25, 0.03 + h), max(0.25, 0.03 + h, min(0.7, 0.97 - h)))  # below the skin, above the image's foot
    if cls == "benign":
        harmonics = [(k, u(0, 0.08), u(0, 2 * math.pi)) for k in (2, 3, 4)]
    else:
        harmonics = [(k, u(0.02, 0.1) * 3 / k ** 0.5, u(0, 2 * math.pi)) for k in (2, 3, 5, 7, 9, 11)]
        harmonics += [(k, u(0.0, 0.08), u(0, 2 * math.pi)) for k in (17, 23, 29)]  # spicules
    mask = _blob(x, y, cx, cy, r, aspect, harmonics, u(-0.3, 0.3))
    if not mask.any():  # a tiny lesion between pixel centres: keep its centre pixel
        size = x.shape[0]
        mask[min(size - 1, round(cy * (size - 1))), min(size - 1, round(cx * (size - 1)))] = True
    return mask, u(0.05, 0.25) if u(0, 1) < 0.2 else u(0.55, 0.9)  # isoechoic or hypoechoic


def _posterior(tissue, mask, gain):
    """Posterior acoustic enhancement (gain > 0: cysts, many benign masses) or shadowing (gain < 0:
    many carcinomas): from the lesion's lower edge downwards, in the lesion's columns, fading with depth."""
    size = mask.shape[0]
    rows = torch.arange(size).view(-1, 1).expand(size, size)
    bottom = torch.where(mask, rows, -1).max(dim=0).values  # per column the lesion's lowest row
    below = (rows > bottom) & (bottom >= 0)
    fade = torch.exp(-(rows - bottom).clamp(min=0) / (0.35 * size))
    effect = F.avg_pool2d((below * fade)[None, None].float(), (1, 5), 1, (0, 2))[0, 0]  # soft column edges
    return tissue * (1 + gain * effect)


def _calipers(image, points, size):
    """The sonographer's measurement marks: small bright '+' crosses (in real BUSI in about 300
    images), drawn after compression at (x, y) points, fractions of the image."""
    arm = max(1, size // 60)
    for px, py in points:
        cx, cy = (min(size - 1, max(0, round(p * (size - 1)))) for p in (px, py))
        image[max(0, cy - arm):cy + arm + 1, cx] = 1.0
        image[cy, max(0, cx - arm):cx + arm + 1] = 1.0
    return image


def _distractors(u, x, y, fat_end, tissue):
    """Dark look-alikes that are not lesions, darkening `tissue`: (tissue, where they darken it).
      fat lobules     0 to 3 flat dark ovals in the subcutaneous fat, in every class: hypoechoic
                      fat lobules, the commonest look-alike of a benign mass;
      contact shadow  in 1 image in 5, a dark vertical band from the skin down: poor probe contact
                      (or a ligament's refraction shadow);
      rib             in 1 image in 4, a bright arc under the chest wall (the bone's surface) with an
                      acoustic shadow below it."""
    dark = torch.zeros(x.shape, dtype=torch.bool)
    for _ in range(int(u(0, 4))):
        lobule = _blob(x, y, u(0, 1), u(0.06, 0.18), u(0.02, 0.06), u(2, 3.5), [(2, u(0, 0.1), u(0, 6.3))])
        lobule &= y < fat_end
        tissue, dark = tissue * (1 - u(0.3, 0.55) * lobule), dark | lobule
    if u(0, 1) < 0.2:
        band = (x - u(0, 1)).abs() < u(0.02, 0.06)
        tissue, dark = tissue * (1 - u(0.4, 0.7) * band), dark | band
    if u(0, 1) < 0.25:
        rib = _blob(x, y, u(0.2, 0.8), u(0.9, 0.97), u(0.06, 0.12), u(2, 3), [])
        surface = rib & ~torch.roll(rib, max(1, x.shape[0] // 60), dims=0)  # bone reflects at its top ...
        shadow = _posterior(torch.ones_like(tissue), surface, -0.85)        # ... and shadows below
        tissue, dark = tissue * (1 + 2 * surface) * shadow, dark | (shadow < 0.7)
    return tissue, dark


def _phantom_stream(count, size, seed, classes):
    """make_phantom's images one at a time: (class, uint8 image array, bool lesion mask, bool map of
    the dark look-alikes that are not lesion, from _distractors)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for i in range(count):
        cls = classes[i % len(classes)]
        fat_end = 0.2 + 0.08 * _smooth_noise(g, size, 3)[0] + u(0, 0.08)
        wall = 0.8 + 0.06 * _smooth_noise(g, size, 3)[0] + u(-0.05, 0.08)
        tissue = torch.where(y < 0.03, 1.0, torch.where(y < fat_end, 0.35, torch.where(y < wall, 0.75, 0.4)))
        tissue = tissue * (1 + 0.35 * _smooth_noise(g, size, 12))
        mask = torch.zeros(size, size, dtype=torch.bool)
        if cls != "normal":
            mask, darkening = _lesion(u, x, y, cls)
            tissue = _posterior(tissue, mask, u(0.15, 0.4) if cls == "benign" else -u(0.3, 0.7))
            inside = F.avg_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0]  # a soft edge
            texture = 1 + 0.25 * _smooth_noise(g, size, 24)  # internal echoes
            tissue = tissue * (1 - inside * darkening) * torch.where(mask, texture, torch.ones(()))
            if darkening < 0.3 and u(0, 1) < 0.6:  # an isoechoic lesion's echogenic rim
                ring = F.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool() & ~mask
                tissue = tissue * (1 + u(0.3, 0.6) * ring)
        tissue, dark = _distractors(u, x, y, fat_end, tissue)
        grain = max(1, size // 112)  # speckle grain about 2 pixels at 224 px
        noise = F.avg_pool2d(torch.randn(2, 1, size, size, generator=g), 2 * grain + 1, 1, grain)
        speckle = noise.pow(2).sum(0)[0].sqrt()
        echo = tissue * speckle / speckle.mean() * torch.exp(-u(0.6, 1.6) * y)
        image = (torch.log1p(30 * echo.clamp(min=0)) / math.log1p(30 * 2.5)).clamp(0, 1)
        if mask.any() and u(0, 1) < 1 / 3:  # calipers at the lesion's left and right ends
            cols = mask.any(dim=0).nonzero()[:, 0].float() / (size - 1)
            rows = mask.any(dim=1).nonzero()[:, 0].float() / (size - 1)
            mid = (rows.min() + rows.max()).item() / 2
            image = _calipers(image, [(cols.min().item() - 0.04, mid), (cols.max().item() + 0.04, mid)], size)
        yield cls, (image * 255).round().to(torch.uint8).numpy(), mask, dark & ~mask


def _phantom_images(count, size, seed, classes):
    """The list of _phantom_stream, made on one CPU thread: on images this small more threads only
    wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return list(_phantom_stream(count, size, seed, classes))
    finally:
        torch.set_num_threads(threads)


def make_phantom(count=240, size=224, seed=0, classes=("benign", "malignant")):
    """Synthetic B-mode breast ultrasound, no download needed, deterministic from `seed`. Per image,
    each element imitating what real scans show:
      tissue    skin (bright line), subcutaneous fat (dark), glandular tissue (bright, textured),
                pectoral muscle and chest wall (darker), with wavy boundaries;
      lesion    one per benign or malignant image (none for normal, opt-in): see _lesion for its
                size, place, outline and echogenicity; isoechoic ones often have a thin echogenic
                rim (halo), and every lesion its own internal echo texture;
      posterior enhancement below benign lesions, shadowing below malignant ones, from the lesion's
                lower edge (_posterior);
      dark look-alikes that are not lesions, in every class: fat lobules (flat dark ovals in the fat
                layer), a poor-contact shadow (a dark band from the skin down) in 1 image in 5,
                a rib (bright arc with a shadow below it) under the chest wall in 1 in 4 (_distractors);
      speckle   the magnitude of low-pass complex Gaussian noise (Rayleigh statistics, as real echo),
                depth attenuation, log compression to 8 bits;
      calipers  bright '+' marks beside the lesion's ends in 1 image in 3 (_calipers).
    Made on one CPU thread (_phantom_images).
    """
    pairs, names, labels = [], [], []
    for i, (cls, image, mask, _) in enumerate(_phantom_images(count, size, seed, classes)):
        pairs.append((image, mask.numpy().astype(np.uint8), hashlib.sha1(image.tobytes()).hexdigest(),
                      _thumbnail(Image.fromarray(image))))
        names.append(f"phantom/{cls} ({i}).png")
        labels.append(cls)
    return _stack(pairs, names, labels, "phantom")


# ----------------------------------------------------------------------------- splits

def near_duplicate_groups(thumbnails, hashes, threshold=0.95):
    """A group key per image: images with identical pixels, or whose thumbnails correlate above
    `threshold` (Pearson's r over the 32 x 32 pixels), share one, and so does every chain of such
    pairs (a union-find). threshold 0: exact copies only.

    Why 0.95: BUSI holds many near-copies (the same scan saved twice, shifted or re-annotated; a
    published audit counts about 235). Over its 647 lesion images, the highest correlation of each
    image with any other falls into two humps: unrelated scans of similar anatomy, mostly 0.7-0.92,
    and near-copies, mostly above 0.96, with few images between 0.92 and 0.95."""
    parent = list(range(len(hashes)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    pairs = [(i, first.setdefault(h, i)) for i, h in enumerate(hashes)]  # exact copies
    if threshold > 0:
        x = thumbnails.flatten(1).double()
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-9)  # a flat thumbnail correlates with nothing
        pairs += (x @ x.T > threshold).nonzero().tolist()
    for i, j in pairs:
        parent[root(i)] = root(j)
    return [root(i) for i in range(len(hashes))]


def make_splits(labels, groups, folds=3, seed=0, val_fraction=0.15):
    """k folds, stratified by class, deterministic from `seed`, leakage-safe.

    Images of one group (same key in `groups`: identical pixels, or near-copies, see
    near_duplicate_groups) always land on the same side of every boundary (BUSI holds one image
    under both benign and malignant). Groups of each class (that of their first image) are shuffled
    and dealt round-robin over the folds; fold i is the test part of split i, and a `val_fraction`
    of each class's remaining groups is its validation part (for early stopping); the rest is
    training. Returns a list of dicts of sorted index lists.
    """
    by_key = {}  # group key -> indices, in order of first appearance
    for i, key in enumerate(groups):
        by_key.setdefault(key, []).append(i)
    by_class = {}
    for members in by_key.values():
        by_class.setdefault(labels[members[0]], []).append(members)
    rng = np.random.default_rng(seed)
    fold_of, start = {}, 0
    for cls in sorted(by_class):
        order = rng.permutation(len(by_class[cls]))
        for j, g in enumerate(order):
            fold_of[id(by_class[cls][g])] = (start + j) % folds
        start += len(order)  # next class starts where this one stopped: balanced fold sizes
    splits = []
    for f in range(folds):
        test, val, train = [], [], []
        rng_val = np.random.default_rng([seed, f])
        for cls in sorted(by_class):
            rest = [g for g in by_class[cls] if fold_of[id(g)] != f]
            test += [i for g in by_class[cls] if fold_of[id(g)] == f for i in g]
            n_val = max(1, int(round(val_fraction * len(rest)))) if len(rest) > 1 else 0
            for j, g in enumerate(rng_val.permutation(len(rest))):
                (val if j < n_val else train).extend(rest[g])
        splits.append(dict(train=sorted(train), val=sorted(val), test=sorted(test)))
    return splits


def hold_out(indices, labels, fraction, seed):
    """A `fraction` of each class's `indices` (rounded; at least one of a class with two or more),
    drawn by `seed`: a validation part held out of a given training part. Returns them sorted."""
    rng = np.random.default_rng(seed)
    held = []
    for cls in sorted({labels[i] for i in indices}):
        mine = [i for i in indices if labels[i] == cls]
        n = max(1, int(round(fraction * len(mine)))) if len(mine) > 1 else 0
        held += [mine[j] for j in rng.permutation(len(mine))[:n]]
    return sorted(held)


# ----------------------------------------------------------------------------- augmentation

AUGMENT = {  # project's choice where the paper gives no numbers
    "none": dict(),
    "weak": dict(flip=True, shift=0.05, zoom=(0.95, 1.05)),
    "strong": dict(flip=True, shift=0.1, zoom=(0.8, 1.25), rotate=15, gamma=(0.7, 1.4), gain=0.3,
                   noise=0.03, dropout=0.01),
}


def _uniform(n, lo, hi, generator, device):
    """n numbers uniform in [lo, hi), drawn from `generator` (on its own device) and moved to `device`."""
    return (lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)).to(device)


def draw(n, level, generator, device="cpu"):
    """The random numbers of one batch's augmentation, one set per image: an affine map `theta`
    (flip, rotation, zoom = random crop/scale, shift, in coordinates of [-1, 1], so at any resolution)
    and, for "strong", a gamma and a depth gain. Apart from `augment`, so that a second view of the same
    images (a teacher's, at its own resolution) can be warped and shaded the same way."""
    p = AUGMENT[level]
    if not p:
        return {}
    rnd = lambda lo, hi: _uniform(n, lo, hi, generator, device)
    angle = rnd(-1, 1) * math.radians(p.get("rotate", 0))
    scale = 1 / rnd(*p["zoom"])  # zoom > 1 samples a smaller window: a random crop, scaled up
    flip = torch.where(rnd(0, 1) < 0.5, -1.0, 1.0) if p["flip"] else torch.ones(n, device=device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, rnd(-1, 1) * 2 * p["shift"]], 1),
                         torch.stack([sin * flip, cos, rnd(-1, 1) * 2 * p["shift"]], 1)], 1)
    if "gamma" not in p:
        return dict(theta=theta)
    return dict(theta=theta, gamma=rnd(*p["gamma"]), slope=rnd(-p["gain"], p["gain"]))


def warp(images, masks, theta):
    """One affine map per image, theta (N, 2, 3), applied to image and mask (if given) alike through
    affine_grid / grid_sample."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return images, masks


def intensity(images, p, gamma, slope, generator):
    """Changes of grey levels that per-image normalisation cannot undo.

    A brightness/contrast change x * c + b is removed exactly by the zero-mean, unit-std
    normalisation that follows, so we change what a scanner's settings change instead:
      gamma  x ** g, g in p["gamma"]: the display's compression curve (dynamic range), non-linear;
      gain   x * (1 + a * (depth - 1/2)), a in [-gain, gain]: time-gain compensation set too high
             or too low, brighter or darker with depth (the image's rows);
    then Gaussian noise (std p["noise"]) and pixel dropout (share p["dropout"] set to 0), drawn here.
    """
    n, dev = images.shape[0], images.device
    depth = torch.linspace(0, 1, images.shape[-2], device=dev).view(1, 1, -1, 1)
    images = images.clamp(min=0) ** gamma.view(n, 1, 1, 1) * (1 + slope.view(n, 1, 1, 1) * (depth - 0.5))
    shape = (n, 1, *images.shape[-2:])
    noise = torch.randn(shape, generator=generator, device=generator.device).to(dev)
    keep = torch.rand(shape, generator=generator, device=generator.device).to(dev) >= p["dropout"]
    return (images + p["noise"] * noise) * keep


def augment(images, masks, level, generator=None, drawn=None):
    """Random augmentation of a whole batch on its device: geometry (`warp`, image and mask alike),
    then, for "strong", grey levels (`intensity`, the image alone).

    images: float (N, 1, S, S) in [0, 1]; masks: (N, 1, S, S) in {0, 1}, or None. Every random number
    comes from `generator` (default: a fresh one seeded 0), never from torch's global generator, so that
    building a module (a regressor, a second teacher) cannot shift the data a run sees. `drawn`: the
    numbers `draw` made for these images already (another view of them); only the noise is drawn here.
    Returns (images, masks) with masks as {0, 1} floats.
    """
    p = AUGMENT[level]
    masks = None if masks is None else masks.float()
    if not p:
        return images, masks
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    drawn = drawn or draw(images.shape[0], level, generator, images.device)
    images, masks = warp(images, masks, drawn["theta"])
    if "gamma" in p:
        images = intensity(images, p, drawn["gamma"], drawn["slope"], generator)
    return images.clamp(0, 1), masks


def normalize(images):
    """Intensity normalisation, per image: zero mean, unit standard deviation."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    return (images - mean) / (std + 1e-6)
