"""The risk-control bounds: hand-computed values, scipy.stats where it has the same
quantity, and the guarantee itself on synthetic exchangeable data (no network)."""

import math

import numpy as np
import pytest

from scanformer_jax import risk_control as rc


def test_binomial_cdf_by_hand_and_against_scipy():
  assert rc.binom_cdf(1, 3, 0.5) == pytest.approx(0.5)  # (1 + 3) / 8
  assert rc.binom_cdf(0, 10, 0.2) == pytest.approx(0.8 ** 10)
  assert rc.binom_cdf(-1, 5, 0.3) == 0.0 and rc.binom_cdf(5, 5, 0.3) == 1.0
  assert rc.binom_cdf(0, 4, 0.0) == 1.0 and rc.binom_cdf(3, 4, 1.0) == 0.0
  stats = pytest.importorskip("scipy.stats")
  k = np.arange(-1, 1002, 37)
  for p in (0.001, 0.01, 0.3, 0.9):
    np.testing.assert_allclose(rc.binom_cdf(k, 1000, p), stats.binom.cdf(k, 1000, p),
                               rtol=1e-9, atol=1e-300)


def test_clopper_pearson_against_scipy():
  stats = pytest.importorskip("scipy.stats")
  for k, n in ((0, 20), (3, 20), (20, 20), (17, 1000)):
    lower, upper = rc.clopper_pearson(k, n, 0.05)
    want_lower = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    want_upper = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert lower == pytest.approx(want_lower, abs=1e-9)
    assert upper == pytest.approx(want_upper, abs=1e-9)
  # By hand: no loss in 20 samples, upper bound 1 - 0.025^(1/20).
  assert rc.clopper_pearson(0, 20)[1] == pytest.approx(1 - 0.025 ** (1 / 20))


def test_hoeffding_bentkus_p_value_by_hand():
  # Zero loss in 230 samples at eps 0.01: Hoeffding (0.99)^230 beats Bentkus e (0.99)^230.
  assert rc.hoeffding_bentkus_p_value(0.0, 230, 0.01) == pytest.approx(0.99 ** 230)
  assert rc.hoeffding_bentkus_p_value(0.0, 230, 0.01) < 0.1 < rc.hoeffding_bentkus_p_value(
      0.0, 229, 0.01)
  assert rc.min_samples(0.01, 0.1) == 230
  assert rc.min_samples(0.01, 0.1, "expectation") == 99  # 1 / (99 + 1) <= 0.01.
  # risk_hat 0.1 of 10 at eps 0.2: exp(-10 KL(0.1 || 0.2)) vs e P(Bin(10, 0.2) <= 1).
  kl = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
  bentkus = math.e * (0.8 ** 10 + 10 * 0.2 * 0.8 ** 9)
  assert rc.hoeffding_bentkus_p_value(0.1, 10, 0.2) == pytest.approx(
      min(math.exp(-10 * kl), bentkus))
  # Above eps the Hoeffding term is 1 and Bentkus decides (capped at 1).
  assert rc.hoeffding_bentkus_p_value(0.5, 10, 0.2) == 1.0
  # 1 loss in 1000 at eps 0.01: Hoeffding, exp(-1000 KL(0.001 || 0.01)) = 0.00118.
  kl = 0.001 * math.log(0.1) + 0.999 * math.log(0.999 / 0.99)
  assert rc.hoeffding_bentkus_p_value(0.001, 1000, 0.01) == pytest.approx(math.exp(-1000 * kl))
  # 5 in 1000: Bentkus wins (0.18 < 0.21).
  stats = pytest.importorskip("scipy.stats")
  bentkus = math.e * stats.binom.cdf(5, 1000, 0.01)
  kl = 0.005 * math.log(0.5) + 0.995 * math.log(0.995 / 0.99)
  assert bentkus < math.exp(-1000 * kl)
  assert rc.hoeffding_bentkus_p_value(0.005, 1000, 0.01) == pytest.approx(bentkus)


def test_wsr_p_value_by_hand():
  # Two zero losses at eps 0.5, delta 0.1: var before = 0.25, then (0.25 + 0.25) / 2.
  # mean after 1 sample = 0.5 / 2 = 0.25, (0 - 0.25)^2 = 0.0625 -> var = 0.3125 / 2.
  cap = 0.75 / 0.5
  bet1 = min(math.sqrt(2 * math.log(10) / (2 * 0.25)), cap)
  bet2 = min(math.sqrt(2 * math.log(10) / (2 * 0.15625)), cap)
  wealth = (1 + bet1 * 0.5) * (1 + bet2 * 0.5)
  assert rc.wsr_p_value([0.0, 0.0], 0.5, 0.1) == pytest.approx(1 / wealth)
  assert rc.wsr_p_value(np.ones(50), 0.5, 0.1) == 1.0  # Losing bets: no evidence.


def test_fixed_sequence_stops_at_the_first_failure():
  assert rc.fixed_sequence([0.01, 0.05, 0.2, 0.01], 0.1) == 1
  assert rc.fixed_sequence([0.3, 0.01], 0.1) == -1
  assert rc.fixed_sequence([0.0, 0.1], 0.1) == 1  # p <= delta rejects.


def test_conformal_risk_control_by_hand():
  # 9 samples, 3 thresholds: loss counts 0, 1, 2 -> (count + 1) / 10 = 0.1, 0.2, 0.3.
  losses = np.zeros((9, 3))
  losses[0, 1:] = 1
  losses[1, 2] = 1
  np.testing.assert_allclose(rc.conformal_risk_control(losses, 0.2)["bound"], [0.1, 0.2, 0.3])
  assert rc.conformal_risk_control(losses, 0.2)["index"] == 1
  assert rc.conformal_risk_control(losses, 0.05)["index"] == -1
  # Not monotone along the grid: a loss at a safer threshold counts at every later one.
  bumpy = np.zeros((9, 3))
  bumpy[0, 0] = 1
  np.testing.assert_allclose(rc.conformal_risk_control(bumpy, 0.2)["bound"], [0.2] * 3)


def test_exit_losses():
  iou = np.array([[0.2, 0.7, 0.8],   # right at the end, wrong at scale 0
                  [0.6, 0.4, 0.9],   # right at 0, wrong at 1
                  [0.1, 0.2, 0.3],   # wrong at the end: nothing to lose
                  [0.55, 0.6, 0.9]])
  exit_at = np.array([0, 1, 0, 0])
  np.testing.assert_array_equal(rc.exit_losses(iou, exit_at, "acc_drop"), [1, 1, 0, 0])
  np.testing.assert_array_equal(rc.exit_losses(iou, exit_at, "iou_drop", margin=0.3),
                                [1, 1, 0, 1])
  np.testing.assert_array_equal(rc.exit_losses(iou, np.full(4, 2), "iou_drop"), [0] * 4)
  with pytest.raises(ValueError, match="unknown exit loss"):
    rc.exit_losses(iou, exit_at, "nope")


def test_realised_risk_interval():
  out = rc.realised_risk(np.array([0] * 95 + [1] * 5))
  assert out["risk"] == 0.05 and out["losses"] == 5 and out["count"] == 100
  assert out["interval"][0] < 0.05 < out["interval"][1]


# ------------------------------------------------------------------ the guarantee
TRIALS, N_CAL, EPS, DELTA = 500, 400, 0.05, 0.1
THRESHOLDS = np.linspace(1.0, 0.0, 41)  # Safest first: stop when the signal >= t.
# Sampling slack of a fraction estimated from 500 trials: 3 standard deviations of a
# binomial proportion at DELTA (sqrt(0.1 * 0.9 / 500) = 0.0134).
SLACK = 3 * math.sqrt(DELTA * (1 - DELTA) / TRIALS)


def _synthetic_losses(rng):
  """[TRIALS, N_CAL, K] losses of a known model, and the exact risk of each threshold.

  Signal s ~ U(0, 1) (the exit head's confidence at scale 0); the sample stops at
  threshold t when s >= t, and stopping loses with probability 1 - s (a calibrated
  head): risk(t) = integral_t^1 (1 - s) ds = (1 - t)^2 / 2.
  """
  s = rng.random((TRIALS, N_CAL))
  bad = rng.random((TRIALS, N_CAL)) < 1 - s
  losses = (s[..., None] >= THRESHOLDS) & bad[..., None]  # [TRIALS, N_CAL, K]
  return losses, (1 - THRESHOLDS) ** 2 / 2


@pytest.mark.parametrize("p_value", rc.P_VALUES)
def test_learn_then_test_holds_its_guarantee_on_exchangeable_data(p_value):
  """Over 500 calibration draws, the chosen threshold's exact risk exceeds EPS in at
  most DELTA (+ SLACK) of them; choosing by the empirical risk alone breaks it."""
  losses, true_risk = _synthetic_losses(np.random.default_rng(0))
  chosen = rc.learn_then_test(losses, EPS, DELTA, p_value)["index"]  # [TRIALS]
  risk = np.where(chosen >= 0, true_risk[np.maximum(chosen, 0)], 0.0)
  assert np.mean(risk > EPS) <= DELTA + SLACK
  assert np.mean(chosen >= 7) > 0.9  # Not trivially safe: t <= 0.825, 17 % stop early.
  naive = (losses.mean(1) <= EPS).sum(-1) - 1  # The empirical risk alone.
  assert np.mean(true_risk[naive] > EPS) > 0.3


def test_conformal_risk_control_holds_in_expectation():
  losses, true_risk = _synthetic_losses(np.random.default_rng(1))
  chosen = rc.conformal_risk_control(losses, EPS)["index"]
  risk = np.where(chosen >= 0, true_risk[np.maximum(chosen, 0)], 0.0)
  assert risk.mean() <= EPS + 3 * risk.std() / math.sqrt(TRIALS)
  assert risk.mean() > 0.6 * EPS  # Uses most of its budget.
