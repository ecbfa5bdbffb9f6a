"""Supervised and distillation losses, one short function per equation.

Equation numbers are those of Behboodi, Brooks & Rivaz 2025, "Optimizing knowledge distillation for
efficient breast ultrasound image segmentation" (AIH 2(2):73-86), the main paper:
    Eq. I    total = alpha * L_distill + (1 - alpha) * L_sup          total_loss
    Eq. II   L_MSE = mean (student - teacher)^2                        mse
    Eq. III  L_KLD = sum_i P_i log(P_i / Q_i), P teacher, Q student   kld
    Eq. IV   L_sup = pixel-wise cross-entropy                          cross_entropy
Where the paper is silent (temperature, the axis of the distributions, how the hidden pathway
compares maps of different widths) the choice is ours, and the function's docstring says which.
Two more methods whose papers give no formulas are built here in their spirit, each part marked
as the paper's idea or our design: T2KD's weight balance loss (Guo et al. 2025) and DCKD's
decoupled contrastive and ranking losses (Pan et al. 2023).
All tensors are NCHW; no function flattens N, C, H, W together, so channels never mix with pixels.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- supervised

def cross_entropy(logits, target):
    """Eq. IV. logits (N, 2, H, W); target (N, 1, H, W) in {0, 1}. Mean over pixels and images."""
    return F.cross_entropy(logits, target[:, 0].long())


def soft_dice_loss(logits, target, eps=1.0):
    """1 - soft Dice of the lesion probability, per image, averaged (optional, not in the paper)."""
    p = logits.softmax(dim=1)[:, 1]
    t = target[:, 0].float()
    inter = (p * t).sum(dim=(1, 2))
    return (1 - (2 * inter + eps) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + eps)).mean()


def balance_weights(target, clamp=(0.01, 0.99)):
    """Per-pixel weights of the weight balance loss, (N, 1, H, W) -> (N, H, W). Per image, lesion
    pixels weigh 0.5 / f and background pixels 0.5 / (1 - f), f the image's lesion fraction clamped
    to [clamp[0], clamp[1]]; then divided by their mean so they average 1 over the image. The lesion
    then holds half the image's total weight whatever its size (while f lies inside the clamp)."""
    t = target[:, 0].float()
    f = t.mean(dim=(1, 2), keepdim=True).clamp(*clamp)
    w = t * (0.5 / f) + (1 - t) * (0.5 / (1 - f))
    return w / w.mean(dim=(1, 2), keepdim=True)


def weight_balance_loss(logits, target, clamp=(0.01, 0.99)):
    """T2KD-style weight balance loss (Guo et al. 2025 stress small lesions and the lesion /
    background imbalance, but their formula is unpublished: this one is our design). Per-pixel
    cross-entropy weighted by balance_weights, averaged over each image's pixels, then over images.
    With f = 0.5 it is plain cross-entropy.
    logits (N, 2, H, W); target (N, 1, H, W) in {0, 1}."""
    ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")  # (N, H, W)
    return (balance_weights(target, clamp) * ce).mean(dim=(1, 2)).mean()


def supervised_loss(logits, target, dice_weight=0.0, kind="ce"):
    """L_sup: cross-entropy (kind="ce", the paper) or the weight balance loss (kind="wb", T2KD-style),
    plus dice_weight * soft Dice if asked for."""
    if kind == "ce":
        loss = cross_entropy(logits, target)
    elif kind == "wb":
        loss = weight_balance_loss(logits, target)
    else:
        raise ValueError(f"unknown supervised loss {kind!r}")
    return loss + dice_weight * soft_dice_loss(logits, target) if dice_weight else loss


# ----------------------------------------------------------------------------- distillation

def mse(student, teacher):
    """Eq. II: mean squared difference over every element."""
    return (student - teacher).pow(2).mean()


def kld(student_logits, teacher_logits, dim, T=1.0):
    """Eq. III: KL(P || Q) = sum_i P_i log(P_i / Q_i) over axis `dim`, P = softmax(teacher / T),
    Q = softmax(student / T); averaged over every other axis (pixels and images, not summed over
    the batch) and scaled by T^2 so its gradients keep their size as T changes (Hinton et al. 2015).
    """
    log_p = F.log_softmax(teacher_logits / T, dim=dim)
    log_q = F.log_softmax(student_logits / T, dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim=dim).mean() * T * T


def cwd(student_logits, teacher_logits, T=1.0):
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel of each image's logits, divided
    by T, is a distribution over its H*W positions (softmax over space, not over classes); KL(teacher
    || student) per channel, averaged over channels and images, times T^2. For a two-class output
    each class's map says where that class lies: the student learns where the teacher looks."""
    return kld(student_logits.flatten(2), teacher_logits.flatten(2), dim=2, T=T)


def attention_map(features, eps=1e-6):
    """Spatial attention map of a feature tensor (Zagoruyko & Komodakis 2017): the mean over
    channels of the squared activation, (N, C, H, W) -> (N, H, W). It needs no parameters, so maps
    of a 1024-channel teacher and a 160-channel student compare directly. Each map is scaled to unit
    root-mean-square (AT's L2 normalisation, times sqrt(H*W)) so that its MSE is of order one."""
    a = features.float().pow(2).mean(dim=1)
    return a / (a.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() + eps)


def logits_loss(s_logits, t_logits, loss="kld", T=1.0):
    """Pathway L: the teacher's raw output maps guide the student's. KLD: a distribution over the
    two classes at each pixel; CWD: over the pixels of each class's map."""
    if loss == "cwd":
        return cwd(s_logits, t_logits, T)
    return mse(s_logits, t_logits) if loss == "mse" else kld(s_logits, t_logits, dim=1, T=T)


def hidden_loss(s_feat, t_feat, loss="kld", T=1.0):
    """Pathway H: bottleneck to bottleneck through attention maps (project's choice). KLD: a
    distribution over the H*W spatial positions of each image's map (flattening H, W only)."""
    s, t = attention_map(s_feat), attention_map(t_feat)
    if loss == "mse":
        return mse(s, t)
    return kld(s.flatten(1), t.flatten(1), dim=1, T=T)


def hidden_regressor_loss(s_feat_regressed, t_feat, loss="kld", T=1.0):
    """Pathway HR: the student's bottleneck, mapped by the regressor to the teacher's width,
    against the teacher's full bottleneck tensor. KLD: a distribution over channels at each position."""
    if loss == "mse":
        return mse(s_feat_regressed, t_feat)
    return kld(s_feat_regressed, t_feat, dim=1, T=T)


def distillation_loss(pathway, loss, s_logits, s_feats, t_logits, t_feats, regressor=None, T=1.0):
    """L_distill for one of the paper's pathways: "logits" (L), "hidden" (H), "hidden_regressor" (HR)."""
    if pathway == "logits":
        return logits_loss(s_logits.float(), t_logits.float(), loss, T)
    if pathway == "hidden":
        return hidden_loss(s_feats["bottleneck"].float(), t_feats["bottleneck"].float(), loss, T)
    if pathway == "hidden_regressor":
        return hidden_regressor_loss(regressor(s_feats["bottleneck"]).float(), t_feats["bottleneck"].float(), loss, T)
    raise ValueError(f"unknown pathway {pathway!r}")


def total_loss(l_distill, l_sup, alpha=0.5):
    """Eq. I: alpha * L_distill + (1 - alpha) * L_sup (the paper: alpha = 0.5)."""
    return alpha * l_distill + (1 - alpha) * l_sup


# ----------------------------------------------------------------------------- DCKD-style contrastive distillation
# In the spirit of Pan et al. 2023 (DCKD, "ABUS tumor segmentation via decouple contrastive knowledge
# distillation", 3D automated breast ultrasound; formulas unpublished): the paper's ideas are to split
# features into tumour and non-tumour parts with the mask, to pull the student's towards the teacher's
# of the same part by a contrastive loss, and to mine hard negatives with a ranking loss. The 2D form,
# the formulas and every constant are our design. Borrowed ideas: CIRKD (Yang et al. 2022, github winycg/CIRKD, losses/cirkd_memory.py and
# cirkd_mini_batch.py) for the student projector, the per-position L2 normalisation and the teacher
# features as contrast keys; IFVD (Wang et al. 2020) and EMKD's region affinity (Qin et al. 2021) for
# using the mask, downsampled to the feature size, to split positions into tumour and non-tumour.

def decouple_mask(mask, size):
    """Tumour positions at feature size: mask (N, 1, H, W) in {0, 1} -> bool (N, h, w), True where
    the tumour covers at least half of the position's area (area-average pooling)."""
    m = mask.float()
    if m.device.type == "mps" and (m.shape[-2] % size[0] or m.shape[-1] % size[1]):
        m = m.cpu()  # MPS pools only whole windows
    return (F.adaptive_avg_pool2d(m, tuple(size))[:, 0] >= 0.5).to(mask.device)


def sample_anchors(region, count, generator):
    """Up to `count` distinct positions where `region` (N, h, w) is True, drawn uniformly with
    `generator` (a CPU torch.Generator: the global RNG is never touched), as (M, 3) long indices
    (n, y, x) on region's device; all of them, in random order, if fewer exist."""
    idx = region.nonzero()
    perm = torch.randperm(idx.shape[0], generator=generator)[:count]
    return idx[perm.to(idx.device)]


def gather_positions(feat, idx):
    """Feature vectors at positions idx (M, 3) = (n, y, x): (N, C, h, w) -> (M, C)."""
    return feat[idx[:, 0], :, idx[:, 1], idx[:, 2]]


def contrastive_loss(s, t_pos, t_neg, tau=0.1):
    """InfoNCE per anchor, (M,): -log( exp(s.t/tau) / (exp(s.t/tau) + sum_k exp(s.t_k/tau)) ).
    s, t_pos (M, C): student anchors and the teacher at the same positions; t_neg (K, C): teacher
    features of the other class, shared by the M anchors. All rows unit length."""
    pos = (s * t_pos).sum(dim=1, keepdim=True) / tau          # (M, 1)
    neg = s @ t_neg.t() / tau                                  # (M, K)
    return torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos[:, 0]


def ranking_loss(s, t_pos, t_neg, hard=8, delta=0.2):
    """Hard-negative ranking per anchor, (M,): with cosine distance d = 1 - cos, the `hard` negatives
    closest to the anchor must lie farther than the positive by a margin delta:
    mean over them of max(0, d(s, t_pos) - d(s, t_k) + delta). Shapes and units as contrastive_loss."""
    d_pos = 1 - (s * t_pos).sum(dim=1, keepdim=True)          # (M, 1)
    d_neg = 1 - s @ t_neg.t()                                  # (M, K)
    nearest = d_neg.topk(min(hard, d_neg.shape[1]), dim=1, largest=False).values
    return F.relu(d_pos - nearest + delta).mean(dim=1)


def dckd_loss(s_feat, t_feat, mask, generator, anchors=128, negatives=256, tau=0.1, hard=8, delta=0.2):
    """DCKD-style decoupled contrastive distillation: (L_con, L_rank), or None when the batch holds
    no tumour or no non-tumour position at the feature scale (the caller skips the term and counts).
    s_feat: the student's features already projected to the teacher's width, (N, C, h, w); t_feat:
    the teacher's, same shape (detached here: no gradient reaches the teacher); mask (N, 1, H, W).
    Per class (tumour, non-tumour), up to `anchors` student positions are drawn, each against the
    teacher at the same position (positive) and up to `negatives` teacher positions of the other
    class drawn from the whole batch; both losses average over the anchors of both classes."""
    assert s_feat.shape == t_feat.shape, (s_feat.shape, t_feat.shape)
    tumour = decouple_mask(mask, s_feat.shape[-2:])
    if not tumour.any() or tumour.all():
        return None
    s = F.normalize(s_feat.float(), dim=1)  # unit length along C at each position
    t = F.normalize(t_feat.detach().float(), dim=1)
    con, rank = [], []
    for region in (tumour, ~tumour):
        a, k = sample_anchors(region, anchors, generator), sample_anchors(~region, negatives, generator)
        s_a, t_a, t_n = gather_positions(s, a), gather_positions(t, a), gather_positions(t, k)
        con.append(contrastive_loss(s_a, t_a, t_n, tau))
        rank.append(ranking_loss(s_a, t_a, t_n, hard, delta))
    return torch.cat(con).mean(), torch.cat(rank).mean()
