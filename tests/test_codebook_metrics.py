"""Codebook-health metrics on hand-constructed cases (exact values), and under jit with a traced step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.train.codebook_metrics import batch_usage, perplexity, update_last_hit, window_usage


def _history():
    """V = 8: codes {0, 1} used at step 1, code 2 at step 5."""
    last_hit = jnp.full((8,), -1, jnp.int32)
    last_hit = update_last_hit(last_hit, jnp.array([[0, 1], [1, 0]]), 1)
    return update_last_hit(last_hit, jnp.array([2, 2, 2]), 5)


def test_update_last_hit():
    last_hit = _history()
    assert last_hit.dtype == jnp.int32 and last_hit.shape == (8,)
    np.testing.assert_array_equal(last_hit, [1, 1, 5, -1, -1, -1, -1, -1])
    # reusing a code moves its step forward, the others keep theirs
    np.testing.assert_array_equal(update_last_hit(last_hit, jnp.array([0]), 7), [7, 1, 5, -1, -1, -1, -1, -1])


@pytest.mark.parametrize(
    ("step", "window", "want"),
    [(5, 3, 1 / 8), (5, 10, 3 / 8), (5, 5, 3 / 8), (5, 4, 1 / 8), (5, 1, 1 / 8), (6, 1, 0.0), (1, 1, 2 / 8)],
)
def test_window_usage(step, window, want):
    # window w at step s counts codes hit at steps s-w+1 .. s: at step 5, window 5 reaches step 1, window 4 does
    # not; at step 1 the later hit of code 2 (step 5) is not counted
    assert float(window_usage(_history(), step, window)) == want


def test_window_usage_never_counts_unused_codes():
    # a window reaching before step 0 must not count last_hit = -1 (never used)
    last_hit = update_last_hit(jnp.full((4,), -1, jnp.int32), jnp.array([3]), 0)
    assert float(window_usage(last_hit, 0, 100)) == 0.25


def test_perplexity_and_batch_usage():
    uniform = jnp.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    np.testing.assert_allclose(perplexity(uniform, 8), 4.0, rtol=1e-6)  # exp(log 4)
    np.testing.assert_allclose(perplexity(jnp.full((3, 5), 6), 8), 1.0)
    # histogram (1/2, 1/4, 1/4): exp(-(0.5 log 0.5 + 2 * 0.25 log 0.25)) = exp(1.5 log 2) = 2^1.5
    np.testing.assert_allclose(perplexity(jnp.array([5, 5, 1, 7]), 8), 2**1.5, rtol=1e-6)
    assert float(batch_usage(uniform, 8)) == 0.5
    assert float(batch_usage(jnp.array([5, 5, 1, 7]), 8)) == 3 / 8
    assert float(batch_usage(jnp.arange(8), 8)) == 1.0


def test_jit_with_traced_step():
    @jax.jit
    def track(last_hit, ids, step):
        last_hit = update_last_hit(last_hit, ids, step)
        return last_hit, window_usage(last_hit, step, 3), perplexity(ids, 8), batch_usage(ids, 8)

    last_hit = jnp.full((8,), -1, jnp.int32)
    last_hit, *_ = track(last_hit, jnp.array([0, 1]), jnp.int32(1))
    last_hit, usage, ppl, used = track(last_hit, jnp.array([2, 2]), jnp.int32(5))
    np.testing.assert_array_equal(last_hit, [1, 1, 5, -1, -1, -1, -1, -1])
    assert float(usage) == 1 / 8 and float(ppl) == 1.0 and float(used) == 1 / 8
    assert float(jax.jit(window_usage)(last_hit, jnp.int32(5), jnp.int32(10))) == 3 / 8
