"""Oracle tests for nemjax.metrics against NumPy / SciPy statements."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nemjax import metrics


def _rng(seed=0):
  return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------- top-k
def _topk_oracle(scores, k, indices=None):
  n, c = scores.shape
  idx = np.arange(n) if indices is None else np.asarray(indices)
  vals, ixs = [], []
  for j in range(c):
    order = np.lexsort((idx, -scores[:, j]))[:k]  # score desc, index asc
    vals.append(scores[order, j])
    ixs.append(idx[order])
  return np.stack(vals), np.stack(ixs)


@pytest.mark.parametrize("batch", [1, 7, 50])
def test_topk_streaming_matches_argsort_with_ties(batch):
  rng = _rng(1)
  n, c, k = 50, 6, 5
  scores = rng.integers(0, 4, size=(n, c)).astype(np.float32)  # many ties
  perm = rng.permutation(n)  # dataset indices arrive in a shuffled order
  state = metrics.topk_init(c, k)
  for s in range(0, n, batch):
    rows = perm[s: s + batch]
    state = metrics.topk_update(state, scores[rows], rows.astype(np.int32))
  ov, oi = _topk_oracle(scores, k)
  np.testing.assert_array_equal(np.asarray(state.indices), oi)
  np.testing.assert_array_equal(np.asarray(state.values), ov)


def test_topk_continuous_and_padding_and_partial():
  rng = _rng(2)
  scores = rng.normal(size=(23, 4)).astype(np.float32)
  state = metrics.topk_init(4, 3)
  # A padded last batch: invalid rows must be ignored even with huge scores.
  pad = np.concatenate([scores[20:], np.full((2, 4), 1e9, np.float32)])
  state = metrics.topk_update(state, scores[:20], np.arange(20))
  state = metrics.topk_update(state, pad, np.arange(20, 25),
                              valid=np.array([True] * 3 + [False] * 2))
  ov, oi = _topk_oracle(scores, 3)
  np.testing.assert_array_equal(np.asarray(state.indices), oi)
  # Fewer images than k: unfilled slots are (-inf, -1).
  s2 = metrics.topk_from_scores(scores[:2], 3)
  assert np.all(np.asarray(s2.indices)[:, 2] == -1)
  assert np.all(np.isneginf(np.asarray(s2.values)[:, 2]))


def test_topk_bad_args():
  with pytest.raises(ValueError):
    metrics.topk_init(0, 3)
  state = metrics.topk_init(4, 2)
  with pytest.raises(ValueError):
    metrics.topk_update(state, np.zeros((3, 5)), np.arange(3))
  with pytest.raises(ValueError):
    metrics.topk_update(state, np.zeros((3, 4)), np.arange(2))
  with pytest.raises(ValueError):
    metrics.topk_update(state, np.zeros((3, 4)), np.arange(3.0))


# ------------------------------------------------------------------------------------- Kendall
def test_kendall_tau_matches_scipy_with_ties():
  rng = _rng(3)
  n, c = 37, 5
  a = rng.integers(0, 5, size=(n, c)).astype(np.float32)
  b = a + rng.integers(-2, 3, size=(n, c))
  b[:, 0] = rng.normal(size=n)  # one column without ties
  tau = np.asarray(metrics.kendall_tau(a, b))
  for j in range(c):
    np.testing.assert_allclose(tau[j], stats.kendalltau(a[:, j], b[:, j]).statistic,
                               rtol=1e-5, atol=1e-6)
  # 1-D inputs give a scalar.
  np.testing.assert_allclose(metrics.kendall_tau(a[:, 1], b[:, 1]), tau[1], rtol=1e-6)


def test_kendall_tau_constant_is_nan():
  a = np.ones((10, 2), np.float32)
  a[:, 1] = np.arange(10)
  tau = np.asarray(metrics.kendall_tau(a, a))
  assert np.isnan(tau[0]) and tau[1] == pytest.approx(1.0)


def test_kendall_cross_and_w_match_loop():
  rng = _rng(4)
  n, c = 60, 4
  init = rng.integers(0, 6, size=(n, c)).astype(np.float32)
  final = np.roll(init, 1, axis=1) + rng.normal(scale=1.0, size=(n, c))
  cross = np.asarray(metrics.kendall_tau_cross(init, final))
  ref = np.array([[stats.kendalltau(init[:, j], final[:, i]).statistic for i in range(c)]
                  for j in range(c)])
  np.testing.assert_allclose(cross, ref, rtol=1e-5, atol=1e-6)
  w = np.asarray(metrics.kendall_tau_w(init, final))
  ref_ii = np.array([[stats.kendalltau(init[:, j], init[:, i]).statistic for i in range(c)]
                     for j in range(c)])
  ref_w = [max(ref[j, i] for i in range(c) if i != j) /
           max(ref_ii[j, i] for i in range(c) if i != j) for j in range(c)]
  np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)


def test_kendall_column_chunks(monkeypatch):
  # Tiny work arrays: columns are processed in several chunks (paired and cross).
  from nemjax.metrics import ranking
  monkeypatch.setattr(ranking, "_MAX_BLOCK_ELEMS", 2 * 11)
  rng = _rng(5)
  a = rng.normal(size=(11, 5)).astype(np.float32)
  b = rng.normal(size=(11, 5)).astype(np.float32)
  tau = np.asarray(ranking.kendall_tau(a, b))
  cross = np.asarray(ranking.kendall_tau_cross(a, b))
  for j in range(5):
    np.testing.assert_allclose(tau[j], stats.kendalltau(a[:, j], b[:, j]).statistic, rtol=1e-12)
    for i in range(5):
      np.testing.assert_allclose(cross[j, i], stats.kendalltau(a[:, j], b[:, i]).statistic,
                                 rtol=1e-12)


def test_kendall_many_ties_small_n_exact():
  # Every tie pattern at small n (including n = 2 and constant columns) equals scipy's τ-b.
  rng = _rng(11)
  for n in (2, 3, 4, 9, 25):
    for levels in (1, 2, 3, 6):
      a = rng.integers(0, levels, size=(n, 4)).astype(np.float64)
      b = rng.integers(0, 3, size=(n, 4)).astype(np.float64)
      b[:, 3] = a[:, 3]
      tau = metrics.kendall_tau(a, b)
      cross = metrics.kendall_tau_cross(a, b)
      for j in range(4):
        np.testing.assert_allclose(tau[j], stats.kendalltau(a[:, j], b[:, j]).statistic,
                                   rtol=1e-12, atol=1e-15, equal_nan=True)
        for i in range(4):
          np.testing.assert_allclose(cross[j, i], stats.kendalltau(a[:, j], b[:, i]).statistic,
                                     rtol=1e-12, atol=1e-15, equal_nan=True)


def test_inversion_count_matches_brute_force():
  from nemjax.metrics import ranking
  rng = _rng(13)
  for n, hi in ((1, 1), (2, 2), (7, 3), (40, 1000), (33, 40)):
    s = rng.integers(0, hi, size=(3, n))
    want = [sum(int(r[i] > r[j]) for i in range(n) for j in range(i + 1, n)) for r in s]
    np.testing.assert_array_equal(ranking._inversions(s), want)


def test_kendall_nan_like_scipy():
  a = np.arange(8.0)
  b = a.copy()
  b[3] = np.nan  # scipy's default nan_policy="propagate"
  assert np.isnan(metrics.kendall_tau(a, b)) and np.isnan(stats.kendalltau(a, b).statistic)
  assert np.isnan(metrics.kendall_tau(np.ones(8), a))  # constant input
  assert np.isnan(stats.kendalltau(np.ones(8), a).statistic)


def test_kendall_broden_scale_exact():
  # n = 100,000 (> Broden's ~63,000 images, beyond any int32 pair count) with heavy ties:
  # ReLU-like zeros and quantised scores, exact against scipy.
  rng = _rng(12)
  n = 100_000
  x = np.maximum(rng.normal(size=n), 0).round(2).astype(np.float32)
  y = (x + rng.normal(scale=0.5, size=n)).astype(np.float32)
  y[rng.random(n) < 0.2] = 0.0
  z = rng.integers(0, 7, size=n).astype(np.float32)
  tau = metrics.kendall_tau(np.stack([x, z], 1), np.stack([y, x], 1))
  np.testing.assert_allclose(tau[0], stats.kendalltau(x, y).statistic, rtol=1e-12)
  np.testing.assert_allclose(tau[1], stats.kendalltau(z, x).statistic, rtol=1e-12, atol=1e-15)


def test_kendall_bad_args():
  with pytest.raises(ValueError):
    metrics.kendall_tau(np.zeros((5, 2)), np.zeros((6, 2)))
  with pytest.raises(ValueError):
    metrics.kendall_tau(np.zeros((5, 2)), np.zeros((5, 3)))
  with pytest.raises(ValueError):
    metrics.kendall_tau_w(np.zeros((5, 1)), np.zeros((5, 1)))


# ------------------------------------------------------------------------------ CLIP-δ / CLIP-W
def _cos(u, v):
  return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _cbar(set_a, set_b, same):
  sims = [_cos(u, v) for (iu, u), (iv, v) in itertools.product(enumerate(set_a), enumerate(set_b))
          if not (same and iu == iv)]
  return float(np.mean(sims))


def _clip_oracle(init, final):
  c = init.shape[0]
  ii = np.array([[_cbar(init[a], init[b], a == b) for b in range(c)] for a in range(c)])
  if_ = np.array([[_cbar(init[a], final[b], False) for b in range(c)] for a in range(c)])
  delta = [(ii[j, j] - if_[j, j]) / np.mean([ii[j, p] for p in range(c) if p != j])
           for j in range(c)]
  w = [max(if_[j, i] for i in range(c) if i != j) / max(ii[j, i] for i in range(c) if i != j)
       for j in range(c)]
  return np.array(delta), np.array(w), ii, if_


def test_clip_delta_and_w_match_loop():
  rng = _rng(6)
  c, k, d = 5, 4, 8
  init = rng.normal(size=(c, k, d)) + 0.5
  final = rng.normal(size=(c, k, d)) + 0.5
  final[0] = init[0]  # unchanged set: δ_0 = (C̄_jj − C̄_jj') / ... with self-pairs included
  final[1, :2] = init[1, :2]  # partial overlap
  delta, w, ii, if_ = _clip_oracle(init, final)
  np.testing.assert_allclose(metrics.set_similarity(init), ii, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.set_similarity(init, final), if_, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.clip_delta(init, final), delta, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics.clip_w(init, final), w, rtol=1e-5, atol=1e-6)


def test_embed_sets_and_penultimate_embedder():
  def apply_fn(state, x):
    feats = jnp.tanh(x @ state)  # (n, H, W, 6)
    return None, {"pool": feats}
  state = jnp.asarray(_rng(7).normal(size=(3, 6)), jnp.float32)
  emb = metrics.penultimate_embedder(apply_fn, state, "pool")
  images = jnp.asarray(_rng(8).uniform(size=(3, 4, 5, 5, 3)), jnp.float32)
  e = metrics.embed_sets(emb, images, batch_size=5)
  assert e.shape == (3, 4, 6)
  ref = np.tanh(np.asarray(images) @ np.asarray(state)).mean(axis=(2, 3))
  np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    metrics.embed_sets(emb, images[0])


def test_clip_bad_args():
  with pytest.raises(ValueError):
    metrics.clip_delta(np.zeros((3, 4)), np.zeros((3, 4)))
  with pytest.raises(ValueError):
    metrics.clip_w(np.ones((1, 2, 3)), np.ones((1, 2, 3)))
  with pytest.raises(ValueError):
    metrics.clip_delta(np.ones((3, 2, 3)), np.ones((3, 2, 4)))


# ------------------------------------------------------------------------------------ fairness
def test_ks_matches_scipy():
  rng = _rng(9)
  for n0, n1, discrete in [(30, 17, False), (25, 40, True), (1, 5, True)]:
    x0 = rng.normal(size=n0).astype(np.float32)
    x1 = (rng.normal(size=n1) + 0.3).astype(np.float32)
    if discrete:
      x0, x1 = np.round(x0 * 2), np.round(x1 * 2)
    ref = stats.ks_2samp(x0, x1).statistic
    np.testing.assert_allclose(metrics.ks_distance(x0, x1), ref, rtol=1e-6, atol=1e-7)


def test_ks_groups_per_channel():
  rng = _rng(10)
  n, c = 50, 3
  v = np.round(rng.normal(size=(n, c)) * 3).astype(np.float32)
  g = rng.integers(0, 3, size=n)  # id 2 belongs to neither group
  d = np.asarray(metrics.ks_distance_groups(v, g))
  for j in range(c):
    ref = stats.ks_2samp(v[g == 0, j], v[g == 1, j]).statistic
    np.testing.assert_allclose(d[j], ref, rtol=1e-6, atol=1e-7)
  assert np.all(np.isnan(np.asarray(metrics.ks_distance_groups(v, np.zeros(n, int)))))


def test_topk_balance():
  groups = np.array([0, 1, 1, 0, 0, 0, 1, 0])
  idx = np.array([[0, 1, 2, 3], [1, 2, 6, -1], [0, 3, 4, 5]])
  bal = np.asarray(metrics.topk_balance(idx, groups))
  np.testing.assert_allclose(bal[:1], [2 / 2])
  assert np.isinf(bal[1])
  assert bal[2] == 0.0
  np.testing.assert_allclose(metrics.topk_balance(idx, groups, minority=0)[0], 1.0)


def test_ddi_deo_match_numpy():
  rng = _rng(11)
  n, k = 200, 4
  logits = rng.normal(size=(n, k))
  pred = logits.argmax(1)
  y = rng.integers(0, k, size=n)
  z = rng.integers(0, 2, size=n)
  for c in range(k):
    ref_ddi = abs(np.mean(pred[z == 0] == c) - np.mean(pred[z == 1] == c))
    m0, m1 = (z == 0) & (y == c), (z == 1) & (y == c)
    ref_deo = abs(np.mean(pred[m0] == c) - np.mean(pred[m1] == c))
    np.testing.assert_allclose(metrics.ddi(pred, z, c), ref_ddi, rtol=1e-6)
    np.testing.assert_allclose(metrics.deo(logits, y, z, c), ref_deo, rtol=1e-6)
  all_c = np.asarray(metrics.ddi(pred, z, np.arange(k)))
  assert all_c.shape == (k,)
  with pytest.raises(ValueError):
    metrics.ddi(pred, z[:-1], 0)


# ------------------------------------------------------------------------------------ accuracy
def test_topk_accuracy_matches_argsort():
  rng = _rng(12)
  n, k = 64, 10
  logits = rng.integers(0, 4, size=(n, k)).astype(np.float32)  # ties
  y = rng.integers(0, k, size=n)
  order = np.argsort(-logits, axis=1, kind="stable")  # ties -> lower index first
  for kk in (1, 5):
    ref = np.mean([y[i] in order[i, :kk] for i in range(n)])
    np.testing.assert_allclose(metrics.topk_accuracy(logits, y, kk), ref, rtol=1e-6)
  np.testing.assert_allclose(metrics.topk_accuracy(logits, y, 1), np.mean(logits.argmax(1) == y))
  counts = np.asarray(metrics.topk_correct(logits, y, (1, 5)))
  assert counts.dtype == np.int32 and counts.shape == (2,)
  with pytest.raises(ValueError):
    metrics.topk_accuracy(logits, y, 11)
  with pytest.raises(ValueError):
    metrics.topk_accuracy(logits, y[:3])
