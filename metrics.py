"""Metrics of the evaluation protocol, as plain functions on arrays: y (N, C) references (1 present, 0 absent; -1
uncertain and nan carry no reference and drop out per label) and scores (N, C).

    per_label_auc        ROC AUC per label (sklearn's) and their macro mean; a one-class label is None, never 0.5
    fast_auc             the same AUC by the Mann-Whitney rank sum, for all labels at once (the bootstrap's)
    bootstrap_auc        95 % percentile intervals over resampled units
    youden_thresholds, threshold_metrics, macro_of   F1 / accuracy / precision at a threshold per label
    sensitivity_thresholds  the operating point that keeps a given share of the positives
    calibration_error, fit_temperature   do probabilities mean what they say; the one-parameter fix
    fit_gaussian, mahalanobis   how far a scan's feature lies from the features the model was trained on
    recall_at_k          retrieval: is the matching item among the top K?
Used by common.validate (training), align.py and evaluate.py; the tests check them against sklearn and by hand.
"""
import numpy as np

from data import DataError

KS = (1, 5, 10, 50, 100)  # retrieval's K


def per_label_auc(y, scores):
    """ROC AUC per label and their mean -> (aucs, macro or None). y (N, C): 1/0, nan or -1 = no reference (row ignored
    for that label); scores (N, C). A label with one class (or none) has no AUC: None, left out of the mean (never 0.5)."""
    from sklearn.metrics import roc_auc_score  # lazy: importing sklearn costs a second at start-up
    y, scores = np.asarray(y, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():  # a diverged model: no AUC is computed from NaN scores
        raise DataError(f"{(~np.isfinite(scores)).any(1).sum()} of {len(scores)} rows have non-finite scores "
                          "(diverged weights? lower --lr)")
    aucs = []
    for c in range(y.shape[1]):
        keep = (y[:, c] == 0) | (y[:, c] == 1)  # nan compares False, so it drops out too
        yc = y[keep, c]  # no AUC without both classes
        aucs.append(None if yc.size == 0 or yc.min() == yc.max() else float(roc_auc_score(yc, scores[keep, c])))
    defined = [a for a in aucs if a is not None]
    return aucs, (float(np.mean(defined)) if defined else None)


def _ci(values):
    """95% percentile interval of the finite values; (nan, nan) if there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return tuple(np.percentile(v, [2.5, 97.5])) if v.size else (np.nan, np.nan)


def fast_auc(y, scores):
    """Per-label AUC by the Mann-Whitney rank sum -> (C,), nan where undefined. Ties get average ranks,
    so it equals sklearn's AUC (per_label_auc), ~50x faster for all labels at once: what makes 1000
    bootstrap resamples take seconds instead of minutes."""
    from scipy.stats import rankdata
    ref = (y == 0) | (y == 1)  # (N, C) rows with a reference, per label
    ranks = rankdata(np.where(ref, scores, np.nan), axis=0, nan_policy="omit")  # ranks among those rows
    npos, nneg = (ref & (y == 1)).sum(0), (ref & (y == 0)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (np.where(ref & (y == 1), ranks, 0).sum(0) - npos * (npos + 1) / 2) / (npos * nneg)
    return np.where((npos > 0) & (nneg > 0), auc, np.nan)


def bootstrap_auc(y, scores, n_boot=1000, seed=0):
    """95% intervals of per-label and macro AUC over n_boot resamples of the units (with replacement).
    A resample where a label has one class is skipped for that label; the macro interval comes from
    the macro (mean over its defined labels) of each resample. -> (per-label [(lo, hi)], macro (lo, hi))"""
    rng = np.random.default_rng(seed)
    per = np.full((n_boot, y.shape[1]), np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, len(y), len(y))  # N draws with replacement
        per[b] = fast_auc(y[idx], scores[idx])
    defined = np.isfinite(per).any(1)  # resamples with at least one defined label
    macro = np.full(n_boot, np.nan)
    macro[defined] = np.nanmean(per[defined], axis=1)
    return [_ci(per[:, c]) for c in range(y.shape[1])], _ci(macro)


def has_ref(y, c):
    return (y[:, c] == 0) | (y[:, c] == 1)  # -1 (uncertain) and nan carry no reference


def youden_thresholds(y, scores):
    """Per label, the threshold maximising Youden's J = tpr - fpr on the ROC curve; nan if undefined.
    Predictions are score >= threshold (roc_curve's convention)."""
    from sklearn.metrics import roc_curve
    t = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        keep = has_ref(y, c)
        if len(np.unique(y[keep, c])) == 2:
            fpr, tpr, thr = roc_curve(y[keep, c], scores[keep, c])
            t[c] = thr[np.argmax(tpr - fpr)]
    return t


def threshold_metrics(y, scores, thresholds):
    """Per label {f1, acc, precision} of (score >= threshold) on the rows with a reference; None for a
    label with one class in y or no threshold. F1 and precision are weighted over the two classes."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score
    rows = []
    for c in range(y.shape[1]):
        keep = has_ref(y, c)
        yc = y[keep, c]
        if len(np.unique(yc)) < 2 or np.isnan(thresholds[c]):
            rows.append(None)
            continue
        pred = (scores[keep, c] >= thresholds[c]).astype(float)
        rows.append({"f1": f1_score(yc, pred, average="weighted", zero_division=0),
                     "acc": accuracy_score(yc, pred),
                     "precision": precision_score(yc, pred, average="weighted", zero_division=0)})
    return rows


def macro_of(rows, key):
    """Mean of rows[i][key] over the defined labels; None if none is defined."""
    vals = [r[key] for r in rows if r is not None]
    return float(np.mean(vals)) if vals else None


def recall_at_k(sim, ks=KS):
    """sim (N, N): query i's match is candidate i. Recall@K = share of queries whose match is in the
    top K (ties counted in the query's favour); K > N is undefined (None), not clipped to N."""
    sim = np.asarray(sim)
    rank = (sim > np.diag(sim)[:, None]).sum(1)  # (N,) candidates scoring above the true match
    return {k: (float((rank < k).mean()) if k <= len(sim) else None) for k in ks}


def sensitivity_thresholds(y, scores, target=0.9):
    """Per label, the highest threshold at which at least `target` of the positives score >= it (a screening
    operating point: few missed findings, more false alarms); nan for a label without positives."""
    t = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        pos = np.sort(scores[has_ref(y, c) & (y[:, c] == 1), c])
        if pos.size:  # every positive from this index on is >= pos[i]: at least target * n of them
            t[c] = pos[int(np.floor((1 - target) * pos.size + 1e-9))]
    return t


def calibration_error(y, p, bins=10):
    """Expected calibration error of probabilities p (N, C) against y, pooled over every (row, label) with a
    reference, in `bins` equal-width bins -> (ece, [(mean probability, observed frequency, count)] per bin).
    ECE = sum over bins of count / total * |frequency - mean probability|: 0 when "0.7" comes true 70% of the time."""
    keep = (y == 0) | (y == 1)
    yy, pp = y[keep].astype(float), np.asarray(p, dtype=float)[keep]
    b = np.minimum((pp * bins).astype(int), bins - 1)
    rows = [(pp[b == k].mean(), yy[b == k].mean(), int((b == k).sum())) if (b == k).any() else (np.nan, np.nan, 0)
            for k in range(bins)]
    return float(sum(n / len(pp) * abs(f - m) for m, f, n in rows if n)), rows


def fit_temperature(logits, y):
    """One temperature T for all labels: the T minimising the binary cross-entropy of sigmoid(logits / T) on the
    rows with a reference (temperature scaling). Dividing by T > 0 keeps every ranking, so AUCs do not change."""
    from scipy.optimize import minimize_scalar
    keep = (y == 0) | (y == 1)
    z, t = np.asarray(logits, dtype=np.float64)[keep], y[keep].astype(np.float64)

    def nll(log_t):  # mean of log(1 + e^s) - t s, with s = z / T: BCE written so that large |s| cannot overflow
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - t * s))
    return float(np.exp(minimize_scalar(nll, bounds=(-7, 7), method="bounded").x))


def fit_gaussian(features):
    """features (N, D) -> (mean (D,), precision (D, D)): a Gaussian with the Ledoit-Wolf shrunk covariance, which
    stays invertible when N is not much larger than D (a few hundred demo volumes, 512 features)."""
    from sklearn.covariance import LedoitWolf
    lw = LedoitWolf().fit(np.asarray(features, dtype=np.float64))
    return lw.location_, lw.precision_


def mahalanobis(features, mean, precision):
    """Distance of each row of features (N, D) from the Gaussian (mean, precision) -> (N,)."""
    d = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, precision, d), 0))
