"""Supervised and distillation losses, one short function per equation.

Equation numbers are those of Behboodi, Brooks & Rivaz 2025 (the main paper, PAPERS.md section 1):
    Eq. I    total = alpha * L_distill + (1 - alpha) * L_sup          total_loss
    Eq. II   L_MSE = mean (student - teacher)^2                        mse
    Eq. III  L_KLD = sum_i P_i log(P_i / Q_i), P teacher, Q student   kld
    Eq. IV   L_sup = pixel-wise cross-entropy                          cross_entropy
Where the paper is silent (temperature, the axis of the distributions, how the hidden pathway
compares maps of different widths) the choice is ours, written here and in PAPERS.md.
All tensors are NCHW; no function flattens N, C, H, W together, so channels never mix with pixels.
"""
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


def supervised_loss(logits, target, dice_weight=0.0):
    """L_sup: cross-entropy (the paper), plus dice_weight * soft Dice if asked for."""
    loss = cross_entropy(logits, target)
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


def attention_map(features, eps=1e-6):
    """Spatial attention map of a feature tensor (Zagoruyko & Komodakis 2017): the mean over
    channels of the squared activation, (N, C, H, W) -> (N, H, W). It needs no parameters, so maps
    of a 1024-channel teacher and a 160-channel student compare directly. Each map is scaled to unit
    root-mean-square (AT's L2 normalisation, times sqrt(H*W)) so that its MSE is of order one."""
    a = features.float().pow(2).mean(dim=1)
    return a / (a.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() + eps)


def logits_loss(s_logits, t_logits, loss="kld", T=1.0):
    """Pathway L: the teacher's raw output maps guide the student's. KLD: a distribution over the
    two classes at each pixel."""
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
