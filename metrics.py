"""Metrics of the evaluation protocol, as plain functions on arrays: y (N, C) references (1 present, 0 absent; -1
uncertain and nan carry no reference and drop out per label) and scores (N, C).

    unit_mean, unit_max  a unit's scores (the mean over its volumes) and reference (the max), e.g. a CT-RATE scan
    per_label_auc        ROC AUC per label (sklearn's) and their macro mean; a one-class label is None, never 0.5
    fast_auc             the same AUC by the Mann-Whitney rank sum, for all labels at once (the bootstrap's)
    bootstrap_auc        95 % percentile intervals over resampled units
    youden_thresholds, threshold_metrics, macro_of   F1 / accuracy / precision at a threshold per label
    sensitivity_thresholds  the operating point that keeps a given share of the positives
    calibration_error, fit_temperature   do probabilities mean what they say; the one-parameter fix
    fit_platt, platt_probabilities       the two-parameter fix per label (a scale and a shift), temperature fallback
    fit_gaussian, mahalanobis   how far a scan's feature lies from the features the model was trained on
    recall_at_k          retrieval: is the matching item among the top K?
  Localisation ("where is it?"): map (D, H, W) of evidence, boolean mask (D, H, W) of the finding, spacing in mm
    pointing_hit, point_hit      is the map's maximum (or any voxel) within tolerance_mm of the finding?
    mass_inside                  share of the map's positive mass inside the mask
    centre_point, random_point, random_hit_rate   the baselines a map must beat (random's rate exact, no sampling)
    localisation_summary         per finding and mean over findings, with 95 % bootstrap intervals over cases
Used by common.validate (training), align.py and evaluate.py; the tests check them against sklearn and by hand.
"""
import numpy as np
from scipy.special import expit

from data import DataError

KS = (1, 5, 10, 50, 100)  # retrieval's K


def unit_mean(inv, x):
    """Average the rows of x (N, K) per unit; inv (N,) is each row's unit index -> (U, K)."""
    out = np.zeros((inv.max() + 1, x.shape[1]))
    np.add.at(out, inv, x)
    return out / np.bincount(inv)[:, None]


def unit_max(inv, y):
    """Reference of a unit = max over its volumes, nan (no reference) ignored -> (U, C)."""
    out = np.full((inv.max() + 1, y.shape[1]), np.nan)
    np.fmax.at(out, inv, y)  # fmax skips nan, so a unit is nan only when all its volumes are
    return out


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


PLATT_MIN_EACH = 10  # a label's positives and negatives needed to fit two numbers; fewer: the temperature instead


def fit_platt(logits, y, temperature, min_each=PLATT_MIN_EACH, max_factor=100.0):
    """Platt scaling per label: p_c = sigmoid(a_c * z_c + b_c), a_c > 0 and b_c fitted by binary cross-entropy on the
    rows of label c with a reference. Why per label: a zero-shot logit's error is a shift per finding (the prompt pair
    leans one way, by a different amount for each finding), which one temperature cannot absorb. a_c > 0 keeps each
    label's ranking, so every per-label AUC is unchanged. Why a_c stays within max_factor of 1 / T: on a score that
    ranks poorly the fit drives a_c towards 0, every probability to the prevalence, and the ranking that the operating
    points rest on into ties. A label with fewer than min_each positives or negatives keeps the temperature
    (a_c = 1 / T, b_c = 0) and is marked unfitted.
    logits, y: (N, C) -> (a (C,), b (C,), fitted (C,) bool)."""
    from scipy.optimize import minimize
    z_all, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    C, log_a0 = z_all.shape[1], -np.log(temperature)
    a, b, fitted = np.full(C, 1 / temperature), np.zeros(C), np.zeros(C, dtype=bool)
    for c in range(C):
        keep = (y[:, c] == 0) | (y[:, c] == 1)
        z, t = z_all[keep, c], y[keep, c].astype(np.float64)
        if min(t.sum(), (1 - t).sum()) < min_each:
            continue

        def nll(w):  # w = (log a, b) -> (BCE of s = a z + b, its gradient); written so that large |s| cannot overflow
            s = np.exp(w[0]) * z + w[1]
            r = 1 / (1 + np.exp(-s)) - t  # dBCE/ds per row
            return float(np.mean(np.logaddexp(0, s) - t * s)), np.array([np.mean(r * s - r * w[1]), np.mean(r)])
        w = minimize(nll, x0=[log_a0, 0.0], jac=True, method="L-BFGS-B",
                     bounds=[(log_a0 - np.log(max_factor), log_a0 + np.log(max_factor)), (None, None)]).x
        a[c], b[c], fitted[c] = np.exp(w[0]), w[1], True
    return a, b, fitted


def platt_probabilities(logits, a, b):
    """sigmoid(a * logits + b), per label: logits (N, C), a and b (C,) -> (N, C). scipy's expit, which does not overflow
    where a scan far from the training data gives a logit of hundreds."""
    return expit(np.asarray(logits, dtype=np.float64) * a + b)


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


# --- Localisation: does the evidence map point at the finding? A map (D, H, W) is evidence (higher = more), a mask
# (D, H, W) bool is where the finding really is, a body mask (D, H, W) bool the voxels inside the patient; spacing is
# the voxel size (D, H, W) in mm, so that distances are in mm on anisotropic grids (3 mm slices, 1.5 mm pixels).
_SLACK_MM = 1e-6  # a distance of exactly tolerance_mm is a hit; this keeps it one when rounding lands just above


def _check_mask(mask):
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():  # no finding to point at: a hit or a miss would both be made up
        raise ValueError("the mask is empty: there is no finding to localise")
    return mask


def point_hit(point, mask, spacing, tolerance_mm):
    """Is voxel `point` (d, h, w) within tolerance_mm of the finding? The Euclidean distance in mm from its centre to
    the nearest mask voxel centre, <= tolerance_mm (inclusive); 0 mm inside the mask. Only one point, so it measures
    to the mask voxels directly instead of a distance transform of the whole volume."""
    mask = _check_mask(mask)
    d = (np.argwhere(mask) - np.asarray(point)) * np.asarray(spacing, dtype=float)  # (M, 3) offsets in mm
    return bool(np.sqrt((d ** 2).sum(1)).min() <= tolerance_mm + _SLACK_MM)


def pointing_hit(map, mask, spacing, tolerance_mm):
    """Pointing game: is the map's maximum within tolerance_mm of the finding (point_hit)? Ties for the maximum go
    to the first voxel in C order (np.argmax), not to any maximal voxel: counting a tie as a hit when any tied voxel
    hits would make a flat, uninformative map a hit on every case."""
    map = np.asarray(map, dtype=float)
    if map.shape != np.shape(mask) or not np.isfinite(map).all():
        raise ValueError(f"the map {map.shape} must be finite and shaped like the mask {np.shape(mask)}")
    return point_hit(np.unravel_index(np.argmax(map), map.shape), mask, spacing, tolerance_mm)


def mass_inside(map, mask):
    """Share of the map's positive evidence inside the mask: sum(max(map, 0)[mask]) / sum(max(map, 0)). Negative
    values (evidence against) are ignored, not subtracted; nan when the map has no positive mass (it points nowhere)."""
    pos = np.maximum(np.asarray(map, dtype=float), 0)
    total = pos.sum()
    return float(pos[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else float("nan")


def centre_point(body):
    """Baseline: the voxel (d, h, w) nearest the body's centre of mass (the mean voxel index, rounded), what a map
    that always points at the middle of the patient would score. (For a hollow body it can lie outside it.)"""
    return tuple(int(i) for i in np.rint(np.argwhere(_check_mask(body)).mean(0)))


def random_point(body, rng):
    """Baseline: one body voxel (d, h, w), uniformly at random (rng: np.random.Generator)."""
    idx = np.argwhere(_check_mask(body))  # (V, 3)
    return tuple(int(i) for i in idx[rng.integers(len(idx))])


def random_hit_rate(body, mask, spacing, tolerance_mm):
    """The random baseline's exact expectation: the share of body voxels within tolerance_mm of the mask, from one
    distance transform (mm to the nearest mask voxel, for every voxel), so the baseline carries no sampling noise."""
    from scipy.ndimage import distance_transform_edt
    body, mask = _check_mask(body), _check_mask(mask)
    dist = distance_transform_edt(~mask, sampling=spacing)  # (D, H, W) mm; 0 inside the mask
    return float((dist[body] <= tolerance_mm + _SLACK_MM).mean())


def localisation_summary(hits_by_finding, n_boot=1000, seed=0):
    """{finding: (n,) 0/1 hits or [0, 1] shares per positive case} -> {"per_finding": {finding: (mean, (lo, hi)) or
    None}, "mean": (mean over findings, (lo, hi)) or None}. Intervals are 95 % percentile bootstraps that resample
    cases within each finding; the mean's interval comes from the mean over findings of each resample. A finding with
    no cases is None and stays out of the mean (never 0 or 0.5, which would pretend it was measured)."""
    rng = np.random.default_rng(seed)
    per, boots = {}, []
    for name, v in hits_by_finding.items():
        v = np.asarray(v, dtype=float)
        if v.size == 0:
            per[name] = None
            continue
        if not np.isfinite(v).all():  # a nan share (a map with no positive mass): the caller decides, 0 or drop
            raise ValueError(f"{name}: non-finite values; count them as 0 or drop those cases first")
        boot = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)  # (n_boot,) means of resampled cases
        per[name] = (float(v.mean()), _ci(boot))
        boots.append(boot)
    mean = (float(np.mean([m for m, _ in filter(None, per.values())])), _ci(np.mean(boots, 0))) if boots else None
    return {"per_finding": per, "mean": mean}
