"""Toy models of superposition: the geometry measures by hand, the closed-form phase losses by
hand, and trained n = 2, m = 1 instances landing in the phase the theory predicts."""

import json

import jax
import numpy as np
import pytest

from sae import toy
from tests_helpers import run_task


def test_feature_geometry_by_hand():
  w = np.array([[[1., 0.], [0., 1.], [1., 1.]]])  # n = 3 features in m = 2 dimensions
  geo = toy.feature_geometry(w)
  np.testing.assert_allclose(geo["norm"][0], [1, 1, np.sqrt(2)])
  # feature 0: (Ŵ_0·W_k)² = 1, 0, 1 -> superposition 1, D_0 = 1/2; feature 2: 1/2, 1/2, 2
  np.testing.assert_allclose(geo["superposition"][0], [1, 1, 1])
  np.testing.assert_allclose(geo["dimensionality"][0], [1 / 2, 1 / 2, 2 / 3])
  np.testing.assert_allclose(toy.dimensions_per_feature(w), [2 / 4])


def test_candidate_losses_by_hand():
  # dense (p = 1): an unrepresented feature costs Var U = 1/12; superposed (1 + r)/6
  np.testing.assert_allclose(list(toy.candidate_losses(0.5, 1.0).values()),
                             [0.5 / 12, 1 / 12, 1.5 / 6])
  # p = 0.1: r (p/3 − p²/4) = 0.5 × 0.030833; superposed 1.5 × 0.01 / 6
  np.testing.assert_allclose(list(toy.candidate_losses(0.5, 0.1).values()),
                             [0.5 * (0.1 / 3 - 0.0025), 0.1 / 3 - 0.0025, 0.0025])


@pytest.mark.parametrize("w, phase", [([1.0, 0.01], "not_represented"),
                                      ([0.0, -1.0], "dedicated"),
                                      ([1.0, -0.9], "superposed")])
def test_phase_of_weights(w, phase):
  assert toy.phase_of(np.array(w)) == phase


@pytest.mark.usefixtures("xla_default_level")
def test_trained_instances_land_in_the_predicted_phase():
  points = [(0.5, 1.0), (2.0, 1.0), (0.5, 0.1)]
  want = ["not_represented", "dedicated", "superposed"]
  assert [toy.theoretical_phase(r, p) for r, p in points] == want
  seeds = 4
  importance = np.array([[1.0, r] for r, _ in points for _ in range(seeds)])
  density = np.array([[p, p] for _, p in points for _ in range(seeds)])
  params, losses = toy.train(jax.random.key(0), importance, density, 1, steps=6000, batch=1024,
                             lr=1e-3, chunks=2)
  w = params["W"].reshape(len(points), seeds, 2)
  best = losses[-1].reshape(len(points), seeds).argmin(-1)  # a seed can stop in a local optimum
  assert [toy.phase_of(w[i, best[i]]) for i in range(len(points))] == want


def test_one_instance_loss_does_not_reach_another_instance():
  importance = np.array([[1.0, 0.5], [1.0, 2.0]])
  density = np.array([[0.3, 0.3], [1.0, 1.0]])
  x = toy.sample(jax.random.key(1), density, 64)
  grads = jax.grad(lambda p: toy.instance_loss(p, x, importance)[0])(
      toy.init(jax.random.key(2), 2, 2, 1))
  assert np.abs(grads["W"][0]).sum() > 0
  np.testing.assert_array_equal(grads["W"][1], 0)
  np.testing.assert_array_equal(grads["b"][1], 0)


def test_sample_fires_with_probability_p_and_is_uniform_when_it_fires():
  p = np.array([[0.05, 0.5, 1.0]])
  x = np.asarray(toy.sample(jax.random.key(0), p, 200_000))[0]
  np.testing.assert_allclose((x > 0).mean(0), p[0], atol=0.005)
  for i in range(3):
    on = x[:, i][x[:, i] > 0]
    np.testing.assert_allclose([on.mean(), on.var()], [1 / 2, 1 / 12], atol=0.01)


def test_toy_superposition_smoke_writes_every_output(tmp_path):
  work = tmp_path / "toy"
  run_task("toy_superposition:smoke", work)
  for name in ("config.json", "metrics.jsonl", "report.md", "results.json", "plots/intro.png",
               "plots/geometry.png", "plots/dimensionality.png", "plots/phase.png"):
    assert (work / name).exists(), name
  results = json.loads((work / "results.json").read_text())
  assert len(results["phase"]["checks"]) == 3 and 0 <= results["phase"]["agreement"] <= 1
  assert len(results["dimensionality"]["dimensions_per_feature"]) == 3
