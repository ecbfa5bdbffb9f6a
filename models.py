"""The U-Net (teacher and student are one class at two widths), the HR pathway's regressor, and an
ensemble of teachers.

Ronneberger et al. 2015, with BatchNorm and padded convolutions so output size == input size.
Widths per level are (w, 2w, 4w, 8w, 16w): w=64 gives the classic 31.0M-parameter U-Net (the
teacher), w=112 about 95M (the main paper's teacher scale), w=10 about 0.76M (the student).

The forward pass returns the feature maps distillation reads, by name, so a reader sees exactly
which tensor a pathway compares (no forward hooks):
    enc1..enc4  encoder levels, full to 1/8 resolution, widths w..8w (the skip connections)
    bottleneck  the encoder's output at 1/16 resolution, width 16w (the paper's "hidden" level)
    dec4..dec1  decoder levels, 1/8 to full resolution, widths 8w..w
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2, the U-Net block."""

    def __init__(self, c_in, c_out):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a DoubleConv: half the resolution, usually twice the channels."""

    def __init__(self, c_in, c_out):
        super().__init__(nn.MaxPool2d(2), DoubleConv(c_in, c_out))


class Up(nn.Module):
    """2x transposed-conv up-sampling, concatenate the encoder's skip, then a DoubleConv."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out)

    def forward(self, x, skip):
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes: pad up to the skip's size
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net with four down-sampling levels; `width` sets every level (w, 2w, 4w, 8w, 16w)."""

    def __init__(self, width=64, in_channels=1, num_classes=2):
        super().__init__()
        self.config = dict(width=width, in_channels=in_channels, num_classes=num_classes)  # rebuilds it
        w1, w2, w3, w4, w5 = (width * 2 ** i for i in range(5))
        self.inc = DoubleConv(in_channels, w1)
        self.down1, self.down2, self.down3, self.down4 = Down(w1, w2), Down(w2, w3), Down(w3, w4), Down(w4, w5)
        self.up4, self.up3, self.up2, self.up1 = Up(w5, w4), Up(w4, w3), Up(w3, w2), Up(w2, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)
        self.feature_channels = dict(enc1=w1, enc2=w2, enc3=w3, enc4=w4, bottleneck=w5, dec4=w4, dec3=w3, dec2=w2, dec1=w1)

    def forward(self, x, return_features=False):
        """x: (N, in_channels, H, W) -> logits (N, num_classes, H, W) [, dict of feature maps]."""
        f = {}
        f["enc1"] = self.inc(x)                            # full resolution, w channels
        f["enc2"] = self.down1(f["enc1"])                  # 1/2, 2w
        f["enc3"] = self.down2(f["enc2"])                  # 1/4, 4w
        f["enc4"] = self.down3(f["enc3"])                  # 1/8, 8w
        f["bottleneck"] = self.down4(f["enc4"])            # 1/16, 16w: the paper's "hidden" level
        f["dec4"] = self.up4(f["bottleneck"], f["enc4"])   # back up, each level joined by its skip
        f["dec3"] = self.up3(f["dec4"], f["enc3"])
        f["dec2"] = self.up2(f["dec3"], f["enc2"])
        f["dec1"] = self.up1(f["dec2"], f["enc1"])         # full resolution, w
        logits = self.head(f["dec1"])                      # 1x1 conv: a score per class per pixel
        return (logits, f) if return_features else logits


class Regressor(nn.Sequential):
    """HR pathway: maps the student's bottleneck (c_s channels) to the teacher's (c_t channels).

    The paper: "two convolution layers followed by a ReLU". Project's choice: a 3x3 then a 1x1
    convolution with a ReLU after each (two linear convolutions in a row would collapse into one
    linear map; the last ReLU matches the teacher's non-negative, post-ReLU bottleneck). It trains
    with the student and is thrown away afterwards: not counted in, nor saved with, the student.
    """

    def __init__(self, c_s, c_t):
        super().__init__(nn.Conv2d(c_s, c_t, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(c_t, c_t, 1), nn.ReLU())


class Projector(nn.Sequential):
    """DCKD-style pathway: maps the student's features (c_s channels) to the teacher's (c_t) before
    the contrastive loss. As CIRKD's projection head (Yang et al. 2022, github winycg/CIRKD): 1x1 conv,
    BatchNorm, ReLU, 1x1 conv, no final ReLU (its output is L2-normalised, so it may be negative).
    It trains with the student and is thrown away afterwards: not counted in, nor saved with, the student.
    """

    def __init__(self, c_s, c_t):
        super().__init__(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True),
                         nn.Conv2d(c_t, c_t, 1, bias=False))


class Ensemble(nn.Module):
    """Several trained U-Nets used as one teacher: the mean of their logits. Distilling an ensemble
    into one small network is the classic use of knowledge distillation (Hinton et al. 2015, Sec. 1).
    Feature maps are not averaged, and none are returned: the members' channels do not correspond,
    so only the logits pathway can distil an ensemble."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.feature_channels = {}

    def forward(self, x, return_features=False):
        logits = torch.stack([m(x) for m in self.members]).mean(0)
        return (logits, {}) if return_features else logits


class Mirrored(nn.Module):
    """A trained teacher's (U-Net, Ensemble or ClassTeachers) mean outputs on the image and on its
    mirror image (left-right, mirrored back): test-time augmentation, and the teacher
    train_student.py --teacher_flip distils from (there with its feature maps, mirrored back and
    averaged the same way). It costs a second forward pass; the lesion's side carries no diagnosis,
    so both views are fair. `extra`: what the model takes after the image (ClassTeachers' index)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.feature_channels = getattr(model, "feature_channels", {})

    def forward(self, x, *extra, return_features=False):
        plain = self.model(x, *extra, return_features=return_features)
        mirror = self.model(x.flip(-1), *extra, return_features=return_features)
        if not return_features:
            return (plain + mirror.flip(-1)) / 2
        (logits, feats), (m_logits, m_feats) = plain, mirror
        return (logits + m_logits.flip(-1)) / 2, {k: (v + m_feats[k].flip(-1)) / 2 for k, v in feats.items()}


class Pooled(nn.Module):
    """A teacher that sees `factor` times the student's resolution (an image of 192 px for a student
    of 96): it knows what the student's grid cannot show, and hands that on. Its logits and feature
    maps are averaged over factor x factor blocks, so they lie on the student's grid; its lesion mask
    on that grid is where the averaged logits favour the lesion. `extra`: as Mirrored's."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor
        self.feature_channels = getattr(model, "feature_channels", {})

    def forward(self, x, *extra, return_features=False):
        pool = lambda t: F.avg_pool2d(t, self.factor)
        out = self.model(x, *extra, return_features=return_features)
        if not return_features:
            return pool(out)
        logits, feats = out
        return pool(logits), {k: pool(v) for k, v in feats.items()}


class ClassTeachers(nn.Module):
    """T2KD's two class teachers used as one (Guo et al. 2025): U-Nets of one width, each trained on
    the images of one class only (train_teacher.py --only_class). route="label": every image goes to
    the teacher of its class, known while training (the student never needs it); route="mean": both
    teachers see every image and their outputs are averaged, an ablation. `classes` names each member's
    class; forward(x, index): index (N,) long, each image's index into `members` (not needed by "mean")."""

    def __init__(self, members, classes, route="label"):
        super().__init__()
        self.members, self.classes, self.route = nn.ModuleList(members), list(classes), route
        self.feature_channels = members[0].feature_channels

    def forward(self, x, index=None, return_features=False):
        if self.route == "mean":
            outs = [m(x, return_features=True) for m in self.members]
            logits = torch.stack([o[0] for o in outs]).mean(0)
            feats = {k: torch.stack([o[1][k] for o in outs]).mean(0) for k in outs[0][1]}
        else:  # each teacher runs on its own images only: one teacher forward per image, as for one teacher
            logits, feats = None, {}
            for c, member in enumerate(self.members):
                mine = (index == c).nonzero()[:, 0]
                if len(mine) == 0:
                    continue
                out, out_feats = member(x[mine], return_features=True)
                if logits is None:
                    logits = out.new_empty((len(x),) + out.shape[1:])
                    feats = {k: v.new_empty((len(x),) + v.shape[1:]) for k, v in out_feats.items()}
                logits[mine] = out
                for k, v in out_feats.items():
                    feats[k][mine] = v
        return (logits, feats) if return_features else logits


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---- the fast inference form

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
    """The fastest eager form of a trained model: BatchNorm folded, channels_last (NHWC, what the
    convolution kernels of GPUs and of oneDNN on CPUs prefer), weights in `dtype` (None: fp32),
    frozen. After folding the net is only convolutions, ReLU, max-pool and concatenation, so bf16
    weights compute what bf16 autocast would, without re-casting the weights at every call."""
    model = fuse_for_inference(model).to(device, memory_format=torch.channels_last).requires_grad_(False)
    return model.to(dtype) if dtype is not None else model


@torch.inference_mode()
def lesion_probability(model, x):
    """Normalised images (N, 1, S, S) -> lesion probability (N, 1, S, S) in float32."""
    dtype = next(model.parameters()).dtype
    return model(x.to(dtype)).float().softmax(dim=1)[:, 1:]
