"""Slow references, transcribed loop by loop from each paper's definition (float64, no vectorised tricks).

a[i], b[i]: paired unit-norm embeddings; scale: the logit multiplier (1 / temperature).
"""

import itertools

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


def negative_scores(anchors, candidates, i, scale, same_modality):
    """Scores of anchor i against its negatives: every other candidate; with `same_modality` also every
    other anchor (SimCLR's 2N - 2 negatives: both views of every other sample)."""
    scores = [logit(anchors[i], candidates[j], scale) for j in range(len(candidates)) if j != i]
    if same_modality:
        scores += [logit(anchors[i], anchors[j], scale) for j in range(len(anchors)) if j != i]
    return scores


def nt_xent(a, b, scale):
    """SimCLR's NT-Xent (Chen et al., 2020): l(i) = -log e^{s(i, i+)} / sum_{k != i} e^{s(i, k)} over the
    2N views, the positive and both views of every other sample in the denominator; mean over 2N."""

    def direction(anchors, candidates):
        total = 0.0
        for i in range(len(anchors)):
            pos = logit(anchors[i], candidates[i], scale)
            denominator = [pos] + negative_scores(anchors, candidates, i, scale, same_modality=True)
            total = total - pos + torch.logsumexp(torch.stack(denominator), 0)
        return total / len(anchors)

    return (direction(a, b) + direction(b, a)) / 2


def dcl(a, b, scale, same_modality=False):
    """DCL (Yeh et al., 2022, eq. 6): -s_ii + log sum over the negatives of exp(s); the paper's form
    (same_modality) sums over both views of every other sample, j != i; both directions."""

    def direction(anchors, candidates):
        total = 0.0
        for i in range(len(anchors)):
            negatives = negative_scores(anchors, candidates, i, scale, same_modality)
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


def hcl(a, b, scale, beta, tau_plus, same_modality=False):
    """HCL (Robinson et al., 2021), as the authors' estimator: importance weights e^{beta s} over the
    N negatives normalised by their mean, debiasing with tau+, floored at N e^{-1/t}; both directions.
    The authors' code (same_modality) takes N = 2B - 2 negatives: both views of every other sample."""

    def direction(anchors, candidates):
        total = 0.0
        for i in range(len(anchors)):
            pos = torch.exp(logit(anchors[i], candidates[i], scale))
            negs = negative_scores(anchors, candidates, i, scale, same_modality)
            n = len(negs)
            imp = [torch.exp(beta * s) for s in negs]
            reweight_neg = sum(w * torch.exp(s) for w, s in zip(imp, negs, strict=False)) / (sum(imp) / n)
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


def mip(vectors):
    """Multilinear inner product (Symile, eq. 1): sum over d of the product of every vector's d-th entry."""
    total = 0.0
    for d in range(len(vectors[0])):
        term = 1.0
        for v in vectors:
            term = term * v[d]
        total = total + term
    return total


def symile(embeddings, scale, negatives, permutations=None):
    """Symile (Saporta et al., 2024, Algorithm 1 and the authors' `Symile` loss): every modality in turn
    is the anchor; anchor row i is contrasted over candidate tuples of the other modalities, the positive
    being (y_i, z_i, ...); cross-entropy over scale * MIP, mean over rows, then mean over anchors.

    negatives="n_squared": the candidates are every tuple of rows of the non-anchor modalities (N^(M-1)).
    negatives="n": N candidates, the positive tuple at j = i and, at j != i, the tuple of row
    permutations[anchor][m][j] of each non-anchor modality m (rows of each shuffled independently).
    """
    names = sorted(embeddings)
    n = len(embeddings[names[0]])
    total = 0.0
    for anchor in names:
        others = [m for m in names if m != anchor]
        if negatives == "n_squared":
            tuples = list(itertools.product(range(n), repeat=len(others)))
        anchor_loss = 0.0
        for i in range(n):
            if negatives == "n":
                tuples = [
                    (i,) * len(others) if j == i else tuple(permutations[anchor][m][j] for m in others)
                    for j in range(n)
                ]
                positive = i
            else:
                positive = tuples.index((i,) * len(others))
            scores = [
                scale * mip([embeddings[anchor][i]] + [embeddings[m][k] for m, k in zip(others, rows, strict=False)])
                for rows in tuples
            ]
            anchor_loss = anchor_loss - log_softmax_at(scores, positive)
        total = total + anchor_loss / n
    return total / len(names)


def supcon(views, scale, aggregation="geometric", extra=()):
    """SupCon over one modality's views (Khosla et al., 2020, eq. 2, L_out; SLIP's image-image term with
    K views): views[i][k] is view k of sample i; every view is an anchor, its positives P(i) the other views
    of its sample, its denominator A(i) every view but itself (and `extra`, explicit negatives). geometric:
    mean over anchors of -1/|P| sum_p log p; arithmetic: -log(1/|P| sum_p p) (Poly-View)."""
    rows = [(i, v) for i in range(len(views)) for v in views[i]] + [(-1, e) for e in extra]
    total, anchors = 0.0, 0
    for a, (i, anchor) in enumerate(rows[: len(rows) - len(extra)]):
        others = [(j, v) for b, (j, v) in enumerate(rows) if b != a]
        scores = [logit(anchor, v, scale) for _, v in others]
        positives = [idx for idx, (j, _) in enumerate(others) if j == i]
        if aggregation == "geometric":
            row = -sum(log_softmax_at(scores, p) for p in positives) / len(positives)
        else:
            row = -torch.log(sum(torch.exp(log_softmax_at(scores, p)) for p in positives) / len(positives))
        total, anchors = total + row, anchors + 1
    return total / anchors
