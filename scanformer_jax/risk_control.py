"""Risk-controlled exit thresholds: distribution-free, finite-sample bounds (numpy only).

Given per-sample losses in [0, 1] of every threshold of a grid (`losses [N, K]`, the
grid ordered from the safest threshold to the most aggressive), pick the most
aggressive one whose risk (expected loss on new data from the same distribution)
is at most `eps`:

  learn_then_test        with probability >= 1 - delta over the draw of the N
                         calibration samples (Angelopoulos et al. 2021, "Learn then
                         Test"): a p-value per threshold for H0 "risk > eps"
                         (Hoeffding-Bentkus, or Waudby-Smith-Ramdas betting), tested
                         in the fixed sequence safest first, stopping at the first
                         that fails; no multiplicity correction is needed.
  conformal_risk_control in expectation over the draw (Angelopoulos et al. 2022):
                         the most aggressive threshold with (N R_hat + 1) / (N + 1)
                         <= eps, on the losses made monotone along the grid.

Both need the calibration and the new samples to be exchangeable (drawn alike); they
say nothing about a shifted distribution. The losses of an early exit (`exit_losses`):
  acc_drop        the sample is right (IoU >= iou_threshold) at the last scale and
                  wrong at its exit;
  iou_drop        its IoU at the exit is below its last-scale IoU by more than
                  `margin`.
`binom_cdf` and `clopper_pearson` are written here (no scipy at run time).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

LOSSES = ("acc_drop", "iou_drop")
P_VALUES = ("hb", "wsr")
GUARANTEES = ("high-probability", "expectation")


# ------------------------------------------------------------------ binomial tails
def _log_factorials(n: int) -> np.ndarray:
  """[n + 1] log(k!) for k = 0..n."""
  return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binom_pmf_table(n: int, p) -> np.ndarray:
  """[..., n + 1] P(Binomial(n, p) = k) for k = 0..n, `p` any shape in [0, 1]."""
  p = np.asarray(p, np.float64)[..., None]  # [..., 1]
  k = np.arange(n + 1, dtype=np.float64)  # [n + 1]
  log_fact = _log_factorials(n)
  log_choose = log_fact[n] - log_fact - log_fact[::-1]  # [n + 1]
  with np.errstate(divide="ignore", invalid="ignore"):
    log_p = np.where(k == 0, 0.0, k * np.log(p))
    log_q = np.where(k == n, 0.0, (n - k) * np.log1p(-p))
  return np.exp(log_choose + log_p + log_q)


def binom_cdf(k, n: int, p) -> np.ndarray:
  """P(Binomial(n, p) <= k), broadcast over `k` (integers, may lie outside 0..n) and `p`."""
  k, p = np.broadcast_arrays(np.asarray(k), np.asarray(p, np.float64))
  cdf = np.cumsum(binom_pmf_table(n, p), axis=-1)  # [..., n + 1]
  index = np.clip(k, 0, n).astype(np.int64)[..., None]
  out = np.minimum(np.take_along_axis(cdf, index, axis=-1)[..., 0], 1.0)
  return np.where(k < 0, 0.0, np.where(k >= n, 1.0, out))


def clopper_pearson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
  """The exact two-sided (1 - alpha) interval of a binomial proportion (bisection on
  `binom_cdf`): (0, 1) when n = 0."""
  if n == 0:
    return 0.0, 1.0

  def solve(target, k):  # The p with P(Bin(n, p) <= k) = target (decreasing in p).
    lo, hi = 0.0, 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      if binom_cdf(k, n, mid) > target:
        lo = mid
      else:
        hi = mid
    return (lo + hi) / 2

  lower = 0.0 if successes == 0 else solve(1 - alpha / 2, successes - 1)
  upper = 1.0 if successes == n else solve(alpha / 2, successes)
  return float(lower), float(upper)


# ------------------------------------------------------------------ p-values
def _kl_bernoulli(a, b) -> np.ndarray:
  """KL(Bernoulli(a) || Bernoulli(b)), with 0 log 0 = 0."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    first = np.where(a == 0, 0.0, a * np.log(a / b))
    second = np.where(a == 1, 0.0, (1 - a) * np.log((1 - a) / (1 - b)))
  return first + second


def hoeffding_bentkus_p_value(risk_hat, n: int, eps: float) -> np.ndarray:
  """p-value of H0 "risk > eps" from the mean loss `risk_hat` (any shape) of n samples
  (losses in [0, 1]): min(Hoeffding exp(-n KL(min(risk_hat, eps) || eps)), Bentkus
  e P(Bin(n, eps) <= ceil(n risk_hat)))  (Bates et al. 2021, eq. 9)."""
  risk_hat = np.asarray(risk_hat, np.float64)
  hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(risk_hat, eps), eps))
  cdf = np.cumsum(binom_pmf_table(n, eps))  # [n + 1]
  counts = np.clip(np.ceil(n * risk_hat - 1e-9), 0, n).astype(np.int64)
  bentkus = math.e * np.minimum(cdf[counts], 1.0)
  return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def wsr_p_value(losses, eps: float, delta: float) -> np.ndarray:
  """p-value of H0 "risk > eps" by betting against it (Waudby-Smith & Ramdas 2024):
  the wealth prod_i (1 + lam_i (eps - loss_i)), a nonnegative supermartingale under
  H0, with predictable bets lam_i = min(sqrt(2 log(1/delta) / (n var_{i-1})),
  0.75 / (1 - eps)); p = min(1, 1 / max wealth) (Ville's inequality). `losses`:
  [..., n] in [0, 1], in their (exchangeable) order; returns [...]."""
  losses = np.asarray(losses, np.float64)
  n = losses.shape[-1]
  t = np.arange(1, n + 1, dtype=np.float64)
  mean = (0.5 + np.cumsum(losses, -1)) / (t + 1)  # [..., n] after sample i
  var = (0.25 + np.cumsum((losses - mean) ** 2, -1)) / (t + 1)
  var_before = np.concatenate([np.full(losses.shape[:-1] + (1,), 0.25), var[..., :-1]], -1)
  bets = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * var_before)), 0.75 / (1 - eps))
  log_wealth = np.cumsum(np.log1p(bets * (eps - losses)), -1)
  return np.minimum(1.0, np.exp(-np.max(log_wealth, -1)))


# ------------------------------------------------------------------ choosing a threshold
def fixed_sequence(p_values, delta: float) -> np.ndarray:
  """Index of the last threshold rejected in the fixed sequence (p-values [..., K] in
  testing order: every earlier one rejected too, p <= delta), -1 when the first fails."""
  passed = np.cumprod(np.asarray(p_values) <= delta, axis=-1)  # [..., K]
  return passed.sum(-1) - 1


def learn_then_test(losses, eps: float, delta: float, p_value: str = "hb") -> dict:
  """The most aggressive threshold with risk <= eps with probability >= 1 - delta.

  losses: [..., N, K] per-sample losses in [0, 1], thresholds safest first. Returns
  {"index": [...] (-1: none meets the bound), "p_values": [..., K], "risk_hat": [..., K]}.
  """
  losses = np.asarray(losses)  # Bool or float: kept as given (large synthetic grids).
  n = losses.shape[-2]
  risk_hat = losses.mean(-2, dtype=np.float64)  # [..., K]
  if p_value == "hb":
    p = hoeffding_bentkus_p_value(risk_hat, n, eps)
  elif p_value == "wsr":
    p = wsr_p_value(np.swapaxes(losses, -1, -2), eps, delta)
  else:
    raise ValueError(f"unknown p-value {p_value!r}; known: {', '.join(P_VALUES)}")
  return {"index": fixed_sequence(p, delta), "p_values": p, "risk_hat": risk_hat}


def conformal_risk_control(losses, eps: float) -> dict:
  """The most aggressive threshold whose expected risk on a new sample is <= eps.

  losses: [..., N, K] in [0, 1], thresholds safest first. The losses are first made
  monotone along the grid (each threshold's loss the largest of it and every safer
  one: an upper bound, so the guarantee carries over); then the largest k with
  (N R_hat_k + 1) / (N + 1) <= eps. Returns {"index", "bound": [..., K], "risk_hat"}.
  """
  losses = np.asarray(losses)
  n = losses.shape[-2]
  monotone = np.maximum.accumulate(losses, axis=-1)  # [..., N, K]
  bound = (monotone.sum(-2, dtype=np.float64) + 1.0) / (n + 1)  # [..., K] nondecreasing
  return {"index": (bound <= eps).sum(-1) - 1, "bound": bound,
          "risk_hat": losses.mean(-2, dtype=np.float64)}


def choose(losses, eps: float, delta: float, guarantee: str = "high-probability",
           p_value: str = "hb") -> dict:
  """`learn_then_test` or `conformal_risk_control` by `guarantee` (GUARANTEES)."""
  if guarantee == "high-probability":
    return learn_then_test(losses, eps, delta, p_value)
  if guarantee == "expectation":
    return conformal_risk_control(losses, eps)
  raise ValueError(f"unknown guarantee {guarantee!r}; known: {', '.join(GUARANTEES)}")


# ------------------------------------------------------------------ exit losses
def exit_losses(iou, exit_scale, loss: str = "acc_drop", iou_threshold: float = 0.5,
                margin: float = 0.1) -> np.ndarray:
  """[...] per-sample loss in {0, 1} of stopping at `exit_scale [...]` instead of the
  last scale, from the full scan's IoU with the ground truth `iou [..., S]`."""
  iou = np.asarray(iou, np.float64)
  exit_scale = np.asarray(exit_scale, np.int64)
  at_exit = np.take_along_axis(iou, exit_scale[..., None], axis=-1)[..., 0]
  last = iou[..., -1]
  if loss == "acc_drop":
    return ((last >= iou_threshold) & (at_exit < iou_threshold)).astype(np.float64)
  if loss == "iou_drop":
    return (last - at_exit > margin).astype(np.float64)
  raise ValueError(f"unknown exit loss {loss!r}; known: {', '.join(LOSSES)}")


def realised_risk(losses, alpha: float = 0.05) -> dict:
  """Mean loss of binary `losses` [N] with its exact (1 - alpha) binomial interval."""
  losses = np.asarray(losses)
  k, n = int(losses.sum()), int(losses.size)
  lower, upper = clopper_pearson(k, n, alpha)
  return {"risk": float(k / n) if n else float("nan"), "losses": k, "count": n,
          "interval": [lower, upper], "interval_level": 1 - alpha}


def min_samples(eps: float, delta: float, guarantee: str = "high-probability"
                ) -> Optional[int]:
  """Fewest calibration samples with which a zero-loss threshold can pass: the
  Hoeffding-Bentkus test needs (1 - eps)^n <= delta, conformal risk control
  1 / (n + 1) <= eps (the message when none can)."""
  if not 0 < eps < 1 or not 0 < delta < 1:
    return None
  if guarantee == "expectation":
    return int(math.ceil(1 / eps - 1 - 1e-9))
  return int(math.ceil(math.log(delta) / math.log1p(-eps)))
