"""The timing helpers every benchmark uses: alternation order, best pass, paired ratios."""

import pytest

from scanformer_jax import timing


def test_alternating_passes_take_turns_and_keep_the_last_result():
  calls = []

  def run(name):
    def go():
      calls.append(name)
      return len(calls)
    return go

  times, last = timing.alternating_passes({"a": run("a"), "b": run("b")}, 3)
  assert calls == ["a", "b"] * 3
  assert [len(t) for t in times.values()] == [3, 3] and last == {"a": 5, "b": 6}
  seconds, out = timing.best_pass(run("c"), 2)
  assert out == 8 and 0 <= seconds


def test_paired_ratios_median_and_spread_by_hand():
  # Baseline / program per round: 2, 1, 4, 3, 5.
  stats = timing.paired_ratios([2.0, 1.0, 4.0, 3.0, 5.0], [1.0] * 5)
  assert stats == {"median": 3.0, "min": 1.0, "max": 5.0, "q25": 2.0, "q75": 4.0, "n": 5}
  assert timing.format_spread(stats) == "3.00x (IQR 2.00-4.00, range 1.00-5.00, 5 pairs)"
  with pytest.raises(ValueError, match="as many rounds"):
    timing.paired_ratios([1.0, 2.0], [1.0])
