"""Where is it: the localisation measures of metrics.py (pointing game, mass inside the mask, the centre and random
baselines, the bootstrap summary) against hand counts on tiny grids with anisotropic spacing, and against scipy's
distance transform."""
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

import metrics

SPACING = (3.0, 1.5, 1.5)  # (D, H, W) mm: thick slices, fine pixels


def one_voxel_mask(shape=(3, 4, 4), at=(0, 0, 0)):
    mask = np.zeros(shape, dtype=bool)
    mask[at] = True
    return mask


def test_point_hit_tolerance_is_inclusive_and_in_mm():
    mask = one_voxel_mask()
    assert metrics.point_hit((0, 0, 0), mask, SPACING, 0)  # inside the mask: 0 mm
    assert metrics.point_hit((1, 0, 0), mask, SPACING, 3.0)  # one step in D = 3 mm: on the boundary, a hit
    assert not metrics.point_hit((1, 0, 0), mask, SPACING, 2.99)  # 3 mm is just beyond a 2.99 mm tolerance: a miss
    assert metrics.point_hit((0, 2, 0), mask, SPACING, 3.0)  # two steps in H = 3 mm too
    assert metrics.point_hit((0, 1, 1), mask, SPACING, np.sqrt(4.5))  # diagonal in-plane: sqrt(1.5^2 + 1.5^2) mm
    assert not metrics.point_hit((0, 1, 1), mask, SPACING, 2.12)
    assert not metrics.point_hit((1, 2, 0), mask, SPACING, 4.24)  # sqrt(3^2 + 3^2) = 4.243 mm
    # anisotropy: at 2 mm a step in H (1.5 mm) hits, a step in D (3 mm) misses, though both are one voxel away
    assert metrics.point_hit((0, 1, 0), mask, SPACING, 2.0) and not metrics.point_hit((1, 0, 0), mask, SPACING, 2.0)
    # the nearest mask voxel counts: a second one at (2, 3, 3) is 1.5 mm from (2, 3, 2)
    mask[2, 3, 3] = True
    assert metrics.point_hit((2, 3, 2), mask, SPACING, 1.5) and not metrics.point_hit((1, 2, 1), mask, SPACING, 3.0)


def test_point_hit_agrees_with_scipy_distance_transform():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 6, 7)) < 0.03
    spacing = (3.0, 1.5, 0.8)
    dist = distance_transform_edt(~mask, sampling=spacing)  # mm from every voxel to the nearest mask voxel
    for tol in (0.0, 1.0, 2.5, 3.7):  # none of them equals a distance on this grid, so rounding cannot decide
        hits = np.array([metrics.point_hit(p, mask, spacing, tol) for p in np.ndindex(mask.shape)]).reshape(mask.shape)
        assert (hits == (dist <= tol)).all() and 0 < hits.sum() < hits.size
        body = rng.random(mask.shape) < 0.5
        assert metrics.random_hit_rate(body, mask, spacing, tol) == pytest.approx(hits[body].mean())


def test_pointing_hit_uses_the_maximum_and_the_first_of_tied_maxima():
    mask = one_voxel_mask(at=(2, 3, 3))
    m = np.zeros((3, 4, 4))
    m[2, 3, 2], m[0, 0, 0] = 5.0, -9.0  # maximum 1.5 mm from the mask; the strong negative is not a maximum
    assert metrics.pointing_hit(m, mask, SPACING, 1.5) and not metrics.pointing_hit(m, mask, SPACING, 1.0)
    m[0, 0, 1] = 5.0  # a tie, earlier in C order and far from the mask: the first maximum decides, a miss
    assert not metrics.pointing_hit(m, mask, SPACING, 1.5)
    assert not metrics.pointing_hit(np.ones((3, 4, 4)), mask, SPACING, 1.5)  # a flat map points at (0, 0, 0)
    with pytest.raises(ValueError):
        metrics.pointing_hit(np.ones((3, 4, 5)), mask, SPACING, 1.5)  # not the mask's grid


def test_empty_mask_raises():
    empty = np.zeros((1, 5, 5), dtype=bool)
    with pytest.raises(ValueError, match="empty"):
        metrics.point_hit((0, 0, 0), empty, SPACING, 10)
    with pytest.raises(ValueError, match="empty"):
        metrics.pointing_hit(np.ones((1, 5, 5)), empty, SPACING, 10)
    with pytest.raises(ValueError, match="empty"):
        metrics.random_hit_rate(np.ones((1, 5, 5), dtype=bool), empty, SPACING, 10)


def test_mass_inside_by_hand():
    m = np.array([[[2.0, -5.0, 1.0], [0.0, 3.0, -1.0]]])  # (1, 2, 3)
    mask = np.array([[[True, True, False], [False, True, False]]])
    assert metrics.mass_inside(m, mask) == pytest.approx(5 / 6)  # positive mass 2 + 1 + 3 = 6, inside 2 + 3; -5 ignored
    assert metrics.mass_inside(m, ~mask) == pytest.approx(1 / 6)
    assert np.isnan(metrics.mass_inside(-np.abs(m) - 1, mask))  # all negative: no mass, no share
    assert np.isnan(metrics.mass_inside(np.zeros_like(m), mask))


def test_centre_and_random_point_baselines():
    body = np.zeros((1, 5, 5), dtype=bool)
    for v in [(0, 1, 1), (0, 1, 2), (0, 1, 3), (0, 2, 1), (0, 4, 3)]:
        body[v] = True
    # mean index: h = (1 + 1 + 1 + 2 + 4) / 5 = 1.8 -> 2, w = (1 + 2 + 3 + 1 + 3) / 5 = 2 (outside this body, as noted)
    assert metrics.centre_point(body) == (0, 2, 2)
    assert metrics.centre_point(np.ones((3, 4, 4), dtype=bool)) == (1, 2, 2)  # means 1, 1.5, 1.5; np.rint: half to even
    rng = np.random.default_rng(0)
    draws = [metrics.random_point(body, rng) for _ in range(5000)]
    counts = {v: draws.count(v) for v in set(draws)}
    assert set(counts) == set(map(tuple, np.argwhere(body))) and all(850 < n < 1150 for n in counts.values())


def test_random_hit_rate_by_hand():
    mask = one_voxel_mask(at=(1, 1, 1))
    body = np.ones((3, 4, 4), dtype=bool)  # 48 voxels
    # 1.5 mm: the voxel and its 4 in-plane neighbours (the D neighbours are 3 mm away)
    assert metrics.random_hit_rate(body, mask, SPACING, 1.5) == pytest.approx(5 / 48)
    # 3 mm: in-plane dh^2 + dw^2 <= 4 from (1, 1) on a 4 x 4 plane: 11 voxels ((-2, 0) and (0, -2) fall off the grid),
    # plus the two D neighbours exactly 3 mm away
    assert metrics.random_hit_rate(body, mask, SPACING, 3.0) == pytest.approx(13 / 48)
    body[[0, 2]] = False  # the body is the middle slice only: 16 voxels
    assert metrics.random_hit_rate(body, mask, SPACING, 1.5) == pytest.approx(5 / 16)


def test_localisation_summary_bootstrap_and_findings_without_cases():
    hits = {"a": [1, 1, 1, 1], "b": [1, 0, 1, 0, 1], "c": []}
    s = metrics.localisation_summary(hits, n_boot=500)
    per, mean = s["per_finding"], s["mean"]
    assert per["c"] is None
    assert per["a"] == (1.0, (1.0, 1.0))  # all cases agree: every resample too, the interval is a point
    m, (lo, hi) = per["b"]
    assert m == pytest.approx(0.6) and lo <= m <= hi and lo < hi
    assert mean[0] == pytest.approx((1.0 + 0.6) / 2)  # "c" is left out, not counted as 0 or 0.5
    assert mean[1][0] <= mean[0] <= mean[1][1] <= 1.0
    assert metrics.localisation_summary(hits, n_boot=500) == s  # the seed fixes the resamples
    s = metrics.localisation_summary({"mass": [0.25, 0.75], "none": []})
    assert s["per_finding"]["mass"][0] == 0.5 and s["mean"][0] == 0.5 and s["per_finding"]["none"] is None
    assert metrics.localisation_summary({"none": []}) == {"per_finding": {"none": None}, "mean": None}
    with pytest.raises(ValueError):
        metrics.localisation_summary({"mass": [0.5, np.nan]})  # a map without positive mass: the caller decides
