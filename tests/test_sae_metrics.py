"""Every SAE / USAE metric against a case computed by hand (formulas in sae/metrics.py)."""

import numpy as np
import pytest

from sae import metrics

X = np.array([[1., 2.], [3., 4.], [8., 0.]])
X_HAT = np.array([[1., 2.], [3., 3.], [7., 1.]])


@pytest.mark.parametrize("name, want", [
    # Σe² = 3; x̿ = 3, Σ(x − 3)² = 40
    ("r2_global", 1 - 3 / 40),
    # x̄ = (4, 2): Σ(x − x̄)² = 26 + 8
    ("explained_variance", 31 / 34),
    # rows: 1 − 0/9, 1 − 1/5, 1 − 2/20
    ("explained_variance_per_token", (1 + 0.8 + 0.9) / 3),
    # var of e per column 2/9, 2/3; of x 26/3, 8/3
    ("fraction_variance_explained", 1 - (8 / 9) / (34 / 3)),
    # columns 1 − 1/26 and 1 − 2/8
    ("r2_per_dimension", (25 / 26 + 0.75) / 2),
])
def test_reconstruction_metrics_by_hand(name, want):
  np.testing.assert_allclose(float(metrics.RECONSTRUCTION[name](X, X_HAT)), want, rtol=1e-6)


def test_the_five_names_give_five_numbers_on_one_reconstruction():
  values = {k: round(float(f(X, X_HAT)), 6) for k, f in metrics.RECONSTRUCTION.items()}
  assert len(set(values.values())) == 5, values
  np.testing.assert_allclose(float(metrics.r2_global(X, X_HAT)), 0.925, rtol=1e-6)


def test_firing_entropy_and_dead_latents():
  counts = np.array([[30, 20, 5, 0], [10, 20, 0, 0]])
  h = np.asarray(metrics.firing_entropy(counts))
  np.testing.assert_allclose(h[:3], [0.811278, 1.0, 0.0], atol=1e-6)
  assert np.isnan(h[3])  # dead: neither universal nor specific
  np.testing.assert_array_equal(metrics.dead_latents(counts), [False, False, False, True])


def test_firing_counts_threshold_and_l0():
  z = np.array([[0.5, 0.0, 2.0], [0.0, 0.0, 0.05]])
  np.testing.assert_array_equal(metrics.firing_counts([z, 2 * z], threshold=0.1),
                                [[1, 0, 1], [1, 0, 1]])
  assert float(metrics.l0(z)) == 1.5
  assert float(metrics.l0(z, threshold=0.1)) == 1.0


def test_co_firing_aggregations():
  # A fires latent 0 on items 0, 1, 2 and latent 1 on item 3; B fires latent 0 on items 1, 2, 3
  a = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
  b = np.array([[0, 0], [1, 0], [1, 0], [1, 0]], np.float32)
  c = metrics.co_firing([a, b], threshold=0.1)
  np.testing.assert_allclose(np.asarray(c["per_latent"]), [2 / 3, 0.0])
  np.testing.assert_allclose(float(c["pooled"]), 2 / 4)
  np.testing.assert_allclose(float(c["mean"]), 1 / 3)
  np.testing.assert_allclose(np.asarray(c["iou"]), [2 / 4, 0.0])


def test_r2_matrix_cross_r2_and_alignment_tax():
  m = np.array([[0.759, 0.618], [0.718, 0.771]])
  np.testing.assert_allclose(float(metrics.cross_r2(m)), (0.618 + 0.718) / 2)
  np.testing.assert_allclose(metrics.alignment_tax(0.8089, 0.7566), 0.0523, atol=1e-12)
  y = X[:, ::-1]
  r = np.asarray(metrics.r2_matrix([X, y], [[X_HAT, y], [X, X_HAT[:, ::-1]]]))
  np.testing.assert_allclose(r, [[0.925, 1.0], [1.0, 1 - 3 / 40]], rtol=1e-6)


def test_energy_is_mean_code_times_decoder_row_norm():
  z = np.array([[1., 0.], [3., 2.]])
  decoder = np.array([[3., 4.], [0., 2.]])
  np.testing.assert_allclose(np.asarray(metrics.energy(z, decoder)), [10.0, 2.0])
