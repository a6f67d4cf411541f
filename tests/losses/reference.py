"""Slow references, transcribed loop by loop from each paper's definition (float64, no vectorised tricks).

a[i], b[i]: paired unit-norm embeddings; scale: the logit multiplier (1 / temperature).
"""

import math

import torch


def logit(x, y, scale):
    return scale * torch.dot(x, y)


def log_softmax_at(scores, index):
    return scores[index] - torch.logsumexp(torch.stack(scores), 0)


def infonce(a, b, scale, label_smoothing=0.0, extra_b=None, extra_a=None):
    """CLIP (Radford et al., 2021): symmetric cross-entropy; optional explicit negatives appended as columns."""
    def direction(anchors, candidates):
        total = 0.0
        for i in range(len(anchors)):
            scores = [logit(anchors[i], c, scale) for c in candidates]
            n = len(scores)
            smoothed = sum(log_softmax_at(scores, j) for j in range(n)) / n
            total = total - ((1 - label_smoothing) * log_softmax_at(scores, i) + label_smoothing * smoothed)
        return total / len(anchors)

    cand_b = list(b) + (list(extra_b) if extra_b is not None else [])
    cand_a = list(a) + (list(extra_a) if extra_a is not None else [])
    return (direction(a, cand_b) + direction(b, cand_a)) / 2


def dcl(a, b, scale):
    """DCL (Yeh et al., 2022): -s_ii + log sum_{j != i} exp(s_ij), both directions."""
    def direction(anchors, candidates):
        total = 0.0
        for i in range(len(anchors)):
            negatives = [logit(anchors[i], candidates[j], scale) for j in range(len(candidates)) if j != i]
            total = total - logit(anchors[i], candidates[i], scale) + torch.logsumexp(torch.stack(negatives), 0)
        return total / len(anchors)

    return (direction(a, b) + direction(b, a)) / 2


def hn_nce(a, b, scale, alpha, beta):
    """HN-NCE (Radenovic et al., 2023): -log( e^{s_ii} / (alpha e^{s_ii} + sum_{j!=i} w_ij e^{s_ij}) ),
    w_ij = (N) e^{beta s_ij} / sum_{k!=i} e^{beta s_ik}, N = number of negatives; both directions."""
    def direction(anchors, candidates):
        total = 0.0
        n = len(candidates) - 1
        for i in range(len(anchors)):
            pos = torch.exp(logit(anchors[i], candidates[i], scale))
            negs = [logit(anchors[i], candidates[j], scale) for j in range(len(candidates)) if j != i]
            norm = sum(torch.exp(beta * s) for s in negs)
            weighted = sum(n * torch.exp(beta * s) / norm * torch.exp(s) for s in negs)
            total = total - torch.log(pos / (alpha * pos + weighted))
        return total / len(anchors)

    return (direction(a, b) + direction(b, a)) / 2


def hcl(a, b, scale, beta, tau_plus):
    """HCL (Robinson et al., 2021), as the authors' estimator: importance weights e^{beta s} over the
    negatives normalised by their mean, debiasing with tau+, floored at N e^{-1/t}; both directions."""
    def direction(anchors, candidates):
        total = 0.0
        n = len(candidates) - 1
        for i in range(len(anchors)):
            pos = torch.exp(logit(anchors[i], candidates[i], scale))
            negs = [logit(anchors[i], candidates[j], scale) for j in range(len(candidates)) if j != i]
            imp = [torch.exp(beta * s) for s in negs]
            reweight_neg = sum(w * torch.exp(s) for w, s in zip(imp, negs)) / (sum(imp) / n)
            ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
            ng = torch.maximum(ng, n * torch.exp(-scale))
            total = total - torch.log(pos / (pos + ng))
        return total / len(anchors)

    return (direction(a, b) + direction(b, a)) / 2


def siglip(a, b, scale, bias):
    """SigLIP (Zhai et al., 2023): -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))."""
    total = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if i == j else -1.0
            total = total - torch.nn.functional.logsigmoid(z * (logit(a[i], b[j], scale) + bias))
    return total / len(a)


def multi_positive(a_views, b_views, scale, aggregation):
    """a_views: (B, Ka, D), b_views: (B, Kb, D). Positives of view (i, k): all views (i, *) of the other
    modality. geometric: mean_p -log softmax_p (SupCon L_out); arithmetic: -log mean_p softmax_p."""
    def direction(anchors, candidates):
        flat = [(j, v) for j in range(len(candidates)) for v in candidates[j]]
        total, rows = 0.0, 0
        for i in range(len(anchors)):
            for anchor in anchors[i]:
                scores = [logit(anchor, v, scale) for _, v in flat]
                positives = [idx for idx, (j, _) in enumerate(flat) if j == i]
                if aggregation == "geometric":
                    row = -sum(log_softmax_at(scores, p) for p in positives) / len(positives)
                else:
                    probs = [torch.exp(log_softmax_at(scores, p)) for p in positives]
                    row = -torch.log(sum(probs) / len(probs))
                total, rows = total + row, rows + 1
        return total / rows

    return (direction(a_views, b_views) + direction(b_views, a_views)) / 2


def symile(embeddings, scale):
    """Symile (Saporta et al., 2024): per target modality, -log softmax over j of
    scale * MIP(target_j, others_i), averaged over samples and targets."""
    names = sorted(embeddings)
    n = len(embeddings[names[0]])
    total = 0.0
    for target in names:
        for i in range(n):
            scores = []
            for j in range(n):
                product = embeddings[target][j].clone()
                for other in names:
                    if other != target:
                        product = product * embeddings[other][i]
                scores.append(scale * product.sum())
            total = total - log_softmax_at(scores, i) / n
    return total / len(names)


