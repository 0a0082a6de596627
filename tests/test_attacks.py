"""Tests for nemjax.attacks: noise, act-avg and act-avg PGD.

Oracles: Pillow's BILINEAR resize of 'F' images, NumPy float64 re-statements, central finite
differences in float64 (under a scoped ``jax.enable_x64``), and a tiny two-layer conv net.
"""

import re
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from PIL import Image

from nemjax.attacks import act_avg as aa
from nemjax.attacks import noise
from nemjax.attacks import pgd as P
from nemjax.ops import resample


# ------------------------------------------------------------------------------------------------
# A tiny model: (N, 32, 32, 3) in [0, 1] -> (N, 8, 8, 6).

def _tiny_params(seed=0, dtype=np.float32):
  rng = np.random.RandomState(seed)
  w1 = rng.randn(3, 3, 3, 8) * 0.5
  w2 = rng.randn(3, 3, 8, 6) * 0.3
  b1 = rng.randn(8) * 0.1
  return tuple(np.asarray(a, dtype) for a in (w1, b1, w2))


def _tiny_features(params, act=jax.nn.relu):
  w1, b1, w2 = params
  dn = ("NHWC", "HWIO", "NHWC")

  def features_fn(x01):
    x = (x01 - 0.45) / 0.25                      # normalisation inside the model function
    h = jax.lax.conv_general_dilated(x, w1, (2, 2), "SAME", dimension_numbers=dn) + b1
    h = act(h)
    h = jax.lax.conv_general_dilated(h, w2, (2, 2), "SAME", dimension_numbers=dn)
    return act(h)
  return features_fn


def _pil_resize(a, out_hw):
  return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F")
                    .resize((out_hw[1], out_hw[0]), Image.BILINEAR))


def _blob_masks(rng, n, sh, sw, empty=()):
  m = np.zeros((n, sh, sw), np.float32)
  for i in range(n):
    if i in empty:
      continue
    y0, x0 = rng.randint(0, sh // 2), rng.randint(0, sw // 2)
    m[i, y0:y0 + rng.randint(2, sh // 2), x0:x0 + rng.randint(2, sw // 2)] = 1.0
  return m


# ------------------------------------------------------------------------------------------------
# Interpolation matrices and act-avg.

@pytest.mark.parametrize("in_size,out_size", [(7, 112), (14, 112), (13, 113), (224, 112),
                                              (113, 112), (56, 112)])
def test_interp_matrix_matches_pillow_bilinear(in_size, out_size):
  rng = np.random.RandomState(in_size)
  a = (rng.randn(in_size, in_size) * 3).astype(np.float32)
  ref = _pil_resize(a, (out_size, out_size))
  r = aa.interp_matrix(in_size, out_size)
  assert r.dtype == np.float64 and r.shape == (out_size, in_size)
  np.testing.assert_allclose(r.sum(1), 1.0, rtol=0, atol=1e-14)
  # The one statement of Pillow's coefficients, shared with the dissection's exact resize.
  np.testing.assert_array_equal(r, resample.resample_matrix(in_size, out_size))
  scale = np.abs(a).max()
  # float64 matrices: Pillow stores each pass in float32, so agreement is to f32 rounding.
  np.testing.assert_allclose(r @ a.astype(np.float64) @ r.T, ref, rtol=0, atol=2e-7 * scale)
  # The float32 JAX upsample used by the attack.
  up = np.asarray(aa.upsample_bilinear(a[None], (out_size, out_size)))[0]
  np.testing.assert_allclose(up, ref, rtol=0, atol=4e-7 * scale)
  # Rectangular: (h, w) -> (sh, sw) with different factors per axis.
  b = rng.randn(in_size, in_size + 3).astype(np.float32)
  up = np.asarray(aa.upsample_bilinear(b[None, ..., None], (out_size, out_size + 5)))[0, ..., 0]
  np.testing.assert_allclose(up, _pil_resize(b, (out_size, out_size + 5)), rtol=0,
                             atol=4e-7 * np.abs(b).max())


def test_interp_matrix_bad_args():
  with pytest.raises(ValueError, match="in_size"):
    aa.interp_matrix(0, 5)
  with pytest.raises(ValueError, match="out_size"):
    aa.interp_matrix(5, -1)


def _act_avg_numpy(acts, masks, units):
  """float64 reference via Pillow's resize: mean of the upsampled unit map over the mask."""
  out = np.zeros(len(units))
  for n, u in enumerate(units):
    up = _pil_resize(acts[n, :, :, u], masks.shape[1:]).astype(np.float64)
    total = masks[n].sum()
    out[n] = (up * masks[n]).sum() / total if total > 0 else 0.0
  return out


def test_projected_act_avg_equals_upsample_then_average():
  rng = np.random.RandomState(1)
  n, h, w, u, sh, sw = 6, 7, 7, 10, 112, 112
  acts = np.maximum(rng.randn(n, h, w, u), 0).astype(np.float32)
  masks = _blob_masks(rng, n, sh, sw, empty=(2,))
  masks[4] = rng.rand(sh, sw) > 0.7            # scattered pixels
  units = rng.randint(0, u, n).astype(np.int32)
  fast = np.asarray(aa.act_avg(acts, masks, units))
  slow = np.asarray(aa.act_avg_upsampled(acts, masks, units))
  ref = _act_avg_numpy(acts, masks, units)
  np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fast, ref, rtol=2e-6, atol=1e-6)
  assert fast[2] == 0.0                          # empty mask -> 0
  # Weighted form: act-avg is linear in the projected weights.
  wts = aa.mask_weights(masks, (h, w))
  np.testing.assert_allclose(np.asarray(aa.act_avg_weighted(acts, wts, units)), fast, rtol=1e-7)
  # project_mask alone reproduces sum_k B(a)_k L_k for every channel.
  ry, rx = aa.interp_matrices((h, w), (sh, sw))
  proj = np.asarray(aa.project_mask(masks, ry, rx))
  up_all = np.asarray(aa.upsample_bilinear(acts, (sh, sw)))
  np.testing.assert_allclose(np.einsum("nhwu,nhw->nu", acts.astype(np.float64), proj),
                             np.einsum("nyxu,nyx->nu", up_all.astype(np.float64), masks),
                             rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("h,w,sh,sw", [(224, 224, 112, 112), (28, 20, 14, 15), (9, 30, 14, 12)])
def test_act_avg_at_a_layer_larger_than_the_label_map(h, w, sh, sw):
  """Maps larger than the label maps (VGG16 conv1_*): the projected-mask path equals Pillow's
  downsampling (wide filter) followed by the masked mean."""
  rng = np.random.RandomState(h + w)
  n, u = 3, 4
  acts = np.maximum(rng.randn(n, h, w, u), 0).astype(np.float32)
  masks = _blob_masks(rng, n, sh, sw)
  masks[1] = rng.rand(sh, sw) > 0.6
  units = np.array([0, 3, 2], np.int32)
  ref = _act_avg_numpy(acts, masks, units)
  np.testing.assert_allclose(np.asarray(aa.act_avg(acts, masks, units)), ref, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aa.act_avg_upsampled(acts, masks, units)), ref,
                             rtol=2e-6, atol=1e-6)
  if (h, w) == (2 * sh, 2 * sw):  # a 2-tap bilinear (2x2 box) downsample would differ
    box = acts.reshape(n, sh, 2, sw, 2, u).mean((2, 4))[np.arange(n), :, :, units]
    plain = (box * masks).sum((1, 2)) / masks.sum((1, 2))
    assert np.abs(plain - ref).max() > 1e-3


def test_u1_attack_at_a_layer_larger_than_the_label_map():
  """act-avg PGD on 8x8 activations with 6x6 concept masks (downsampled act-avg)."""
  rng = np.random.RandomState(9)
  feats = _tiny_features(_tiny_params(1))
  x = jnp.asarray(rng.rand(4, 32, 32, 3).astype(np.float32))
  src = jnp.asarray(_blob_masks(rng, 4, 6, 6))
  units = jnp.asarray([0, 2, 5, 1], jnp.int32)
  acts = np.asarray(feats(x))
  assert acts.shape[1:3] == (8, 8)
  np.testing.assert_allclose(np.asarray(aa.act_avg(acts, src, units)),
                             _act_avg_numpy(acts, np.asarray(src), np.asarray(units)),
                             rtol=2e-6, atol=1e-6)
  attack = P.make_act_avg_attack(feats, eps=8 / 255, steps=5, objective="u1")
  x_adv = attack(x, units, src)
  s0, s1 = aa.act_avg(feats(x), src, units), aa.act_avg(feats(x_adv), src, units)
  assert np.all(np.asarray(s1) <= np.asarray(s0)) and float(jnp.sum(s0 - s1)) > 0
  assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6


def test_act_avg_bad_shapes():
  acts = jnp.zeros((2, 7, 7, 4))
  with pytest.raises(ValueError, match="units"):
    aa.act_avg(acts, jnp.zeros((2, 14, 14)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="masks"):
    aa.act_avg(acts, jnp.zeros((3, 14, 14)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="acts"):
    aa.act_avg(jnp.zeros((2, 7, 7)), jnp.zeros((2, 14, 14)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="weights"):
    aa.act_avg_weighted(acts, jnp.zeros((2, 6, 7)), jnp.zeros((2,), jnp.int32))


def _central_fd(f, x, v, h):
  return (f(x + h * v) - f(x - h * v)) / (2 * h)


def test_act_avg_gradient_wrt_acts_matches_finite_differences():
  rng = np.random.RandomState(2)
  n, hh, ww, u, sh, sw = 3, 5, 6, 4, 40, 45
  with jax.enable_x64(True):
    acts = jnp.asarray(rng.randn(n, hh, ww, u))
    masks = jnp.asarray(_blob_masks(rng, n, sh, sw).astype(np.float64))
    units = jnp.asarray([0, 3, 1])
    f = lambda a: jnp.sum(aa.act_avg(a, masks, units) * jnp.arange(1.0, n + 1))
    g = jax.grad(f)(acts)
    assert g.dtype == jnp.float64
    for seed in range(4):
      v = jnp.asarray(np.random.RandomState(seed).randn(*acts.shape))
      fd = _central_fd(f, acts, v, 1e-5)
      np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-8, atol=1e-10)
    # Gradient w.r.t. acts of image n is nonzero only in its own unit's channel.
    other = np.ones((n, u), bool)
    other[np.arange(n), np.asarray(units)] = False
    assert np.all(np.asarray(g).transpose(0, 3, 1, 2)[other] == 0.0)
    # The upsample-then-average path has the same gradient.
    g2 = jax.grad(lambda a: jnp.sum(aa.act_avg_upsampled(a, masks, units)
                                    * jnp.arange(1.0, n + 1)))(acts)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g2), rtol=1e-10, atol=1e-13)


def test_act_avg_gradient_wrt_image_matches_finite_differences():
  rng = np.random.RandomState(3)
  with jax.enable_x64(True):
    feats = _tiny_features(_tiny_params(0, np.float64), act=jnp.tanh)
    x = jnp.asarray(rng.rand(2, 32, 32, 3))
    src = jnp.asarray(_blob_masks(rng, 2, 16, 16).astype(np.float64))
    tgt = jnp.asarray(_blob_masks(rng, 2, 16, 16).astype(np.float64))
    units = jnp.asarray([1, 4])
    loss = P.targeted_loss(feats, x, units, src, tgt)
    f = lambda xx: jnp.sum(loss(xx))
    g = jax.grad(f)(x)
    assert g.dtype == jnp.float64
    for seed in range(3):
      v = jnp.asarray(np.random.RandomState(10 + seed).randn(*x.shape))
      np.testing.assert_allclose(float(jnp.vdot(g, v)), float(_central_fd(f, x, v, 1e-5)),
                                 rtol=1e-7, atol=1e-10)
    # Per-image independence: image 0's loss has no gradient on image 1.
    g0 = jax.grad(lambda xx: loss(xx)[0])(x)
    assert float(jnp.abs(g0[1]).max()) == 0.0
    # The loss equals act_avg(src) - act_avg(tgt) computed the explicit way.
    acts = feats(x)
    expect = aa.act_avg_upsampled(acts, src, units) - aa.act_avg_upsampled(acts, tgt, units)
    np.testing.assert_allclose(np.asarray(loss(x)), np.asarray(expect), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Concept masks.

def test_concept_mask_from_labels():
  pixels = np.zeros((3, 2, 4, 5), np.int32)
  pixels[0, 0, 1, 2] = 7
  pixels[0, 1, 3, 4] = 7
  pixels[1, 1, 0, 0] = 9
  scalars = np.array([[0, 0], [12, 7], [0, 12]], np.int32)
  m = np.asarray(aa.concept_mask_from_labels(pixels, scalars, 7))
  assert m.dtype == np.float32 and m.shape == (3, 4, 5)
  expect0 = np.zeros((4, 5))
  expect0[1, 2] = expect0[3, 4] = 1
  np.testing.assert_array_equal(m[0], expect0)
  np.testing.assert_array_equal(m[1], 1.0)       # image-level label -> whole image
  np.testing.assert_array_equal(m[2], 0.0)
  np.testing.assert_array_equal(np.asarray(aa.concept_mask_from_labels(pixels, scalars, 12))[2], 1)
  with pytest.raises(ValueError, match="concept"):
    aa.concept_mask_from_labels(pixels, scalars, 0)
  with pytest.raises(ValueError, match="scalars"):
    aa.concept_mask_from_labels(pixels, scalars[:2], 7)


def test_concept_mask_from_unit_masks_is_union_of_dissection_masks():
  rng = np.random.RandomState(4)
  acts = rng.rand(3, 7, 7, 5).astype(np.float32)
  thr = np.quantile(acts.reshape(-1, 5), 0.9, axis=0).astype(np.float32)
  m = np.asarray(aa.concept_mask_from_unit_masks(acts, thr, [1, 3], (56, 56)))
  ref = np.zeros((3, 56, 56), bool)
  for n in range(3):
    for u in (1, 3):
      ref[n] |= _pil_resize(acts[n, :, :, u], (56, 56)) > thr[u]
  assert np.mean(m != ref) < 1e-3                 # float32 ties at the threshold only
  assert ref.any() and not ref.all()
  with pytest.raises(ValueError, match="unit_ids"):
    aa.concept_mask_from_unit_masks(acts, thr, [], (56, 56))
  with pytest.raises(ValueError, match="unit_ids"):
    aa.concept_mask_from_unit_masks(acts, thr, [5], (56, 56))
  with pytest.raises(ValueError, match="thresholds"):
    aa.concept_mask_from_unit_masks(acts, thr[:4], [1], (56, 56))


# ------------------------------------------------------------------------------------------------
# PGD.

def _attack_problem(seed=0, n=4):
  rng = np.random.RandomState(seed)
  feats = _tiny_features(_tiny_params(seed))
  x = jnp.asarray(rng.rand(n, 32, 32, 3).astype(np.float32))
  src = jnp.asarray(_blob_masks(rng, n, 16, 16))
  tgt = jnp.asarray(_blob_masks(rng, n, 16, 16))
  units = jnp.asarray(rng.randint(0, 6, n).astype(np.int32))
  return feats, x, units, src, tgt


def test_pgd_iterates_stay_in_eps_ball_and_unit_box():
  feats, x, units, src, tgt = _attack_problem(5)
  x = x.at[0].set(jnp.where(x[0] > 0.5, 1.0, 0.0))  # pixels on the box boundary
  eps, steps = 8 / 255, 6
  loss = P.targeted_loss(feats, x, units, src, tgt)
  for random_start in (False, True):
    x_adv, traj = P.pgd(loss, x, eps=eps, steps=steps, random_start=random_start,
                        key=jax.random.key(0), return_trajectory=True)
    traj = np.asarray(traj)
    assert traj.shape == (steps + 1,) + x.shape
    np.testing.assert_array_equal(traj[-1], np.asarray(x_adv))
    assert np.all(np.abs(traj - np.asarray(x)[None]) <= eps + 1e-6)
    assert traj.min() >= 0.0 and traj.max() <= 1.0
    if not random_start:
      np.testing.assert_array_equal(traj[0], np.asarray(x))   # the paper's zero start
    # Iterates move: each step changes pixels by at most 2*eps/steps.
    assert np.all(np.abs(np.diff(traj[1:], axis=0)) <= 2 * eps / steps + 1e-6)
    assert np.abs(traj[-1] - np.asarray(x)).max() > eps / 2


def test_pgd_loops_agree_and_match_manual_steps():
  feats, x, units, src, tgt = _attack_problem(6)
  eps, steps = 4 / 255, 3
  loss = P.targeted_loss(feats, x, units, src, tgt)
  outs = {loop: np.asarray(jax.jit(lambda xx, loop=loop: P.pgd(
    loss, xx, eps=eps, steps=steps, loop=loop))(x)) for loop in ("fori", "scan", "unroll")}
  # Manual: the parts, composed by hand.
  xa = x
  for _ in range(steps):
    g = jax.grad(lambda z: jnp.sum(loss(z)))(xa)
    xa = P.project_linf(P.sign_descent(xa, g, 2 * eps / steps), x, eps)
  for loop, out in outs.items():
    np.testing.assert_allclose(out, np.asarray(xa), atol=1e-6, err_msg=loop)
  # make_act_avg_attack, all loop kinds, including the donated Python loop.
  for loop in P.LOOPS:
    attack = P.make_act_avg_attack(feats, eps=eps, steps=steps, objective="targeted", loop=loop)
    x_copy = jnp.array(x, copy=True)
    out = np.asarray(attack(x_copy, units, src, tgt))
    np.testing.assert_allclose(out, np.asarray(xa), atol=1e-6, err_msg=loop)
    np.testing.assert_array_equal(np.asarray(x_copy), np.asarray(x))  # input not donated


def test_targeted_attack_raises_target_and_lowers_source():
  feats, x, units, src, tgt = _attack_problem(7, n=6)
  attack = P.make_act_avg_attack(feats, eps=8 / 255, steps=10, objective="targeted")
  x_adv = attack(x, units, src, tgt)
  a0, a1 = feats(x), feats(x_adv)
  s0, s1 = aa.act_avg(a0, src, units), aa.act_avg(a1, src, units)
  t0, t1 = aa.act_avg(a0, tgt, units), aa.act_avg(a1, tgt, units)
  assert np.all(np.asarray(s1 - t1) < np.asarray(s0 - t0))       # the objective decreased
  assert np.mean(np.asarray(t1 > t0)) >= 0.8 and float(jnp.sum(t1 - t0)) > 0
  assert np.mean(np.asarray(s1 < s0)) >= 0.8 and float(jnp.sum(s1 - s0)) < 0
  assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6
  # Second call with the same shapes does not recompile.
  attack(x + 0.0, units, src, tgt)
  assert attack.step._cache_size() == 1 and attack.prepare._cache_size() == 1


def test_untargeted_u1_lowers_source():
  feats, x, units, src, _ = _attack_problem(8, n=6)
  attack = P.make_act_avg_attack(feats, eps=8 / 255, steps=10, objective="u1",
                                 random_start=True)
  x_adv = attack(x, units, src, None, jax.random.key(3))
  s0, s1 = aa.act_avg(feats(x), src, units), aa.act_avg(feats(x_adv), src, units)
  assert np.all(np.asarray(s1) <= np.asarray(s0)) and np.all(np.asarray(s1 < s0)[np.asarray(s0) > 0])


def test_u2_random_targets_deterministic_and_never_source():
  cands = np.arange(1, 8)
  exclude = np.array([1, 3, 3, 7, 5, 2] * 50)
  t1 = np.asarray(P.random_targets(jax.random.key(0), cands, exclude))
  t2 = np.asarray(P.random_targets(jax.random.key(0), cands, exclude))
  t3 = np.asarray(P.random_targets(jax.random.key(1), cands, exclude))
  np.testing.assert_array_equal(t1, t2)
  assert not np.array_equal(t1, t3)
  assert np.all(t1 != exclude) and np.all(np.isin(t1, cands))
  assert set(t1.tolist()) == set(cands.tolist())        # every candidate is reachable
  with pytest.raises(ValueError, match="candidates"):
    P.random_targets(jax.random.key(0), [4], [4])
  # Concept 0 (Broden's "no label") is never a target.
  t0 = np.asarray(P.random_targets(jax.random.key(2), np.arange(0, 4), np.full(200, 1)))
  assert set(t0.tolist()) == {2, 3}
  with pytest.raises(ValueError, match="candidates"):
    P.random_targets(jax.random.key(0), [0, 4], [4])
  # U2 runs as the targeted objective with the random target's masks.
  feats, x, units, src, tgt = _attack_problem(9)
  attack = P.make_act_avg_attack(feats, eps=4 / 255, steps=4, objective="u2")
  x_adv = attack(x, units, src, tgt)
  assert x_adv.shape == x.shape


def test_pgd_bad_args():
  feats, x, units, src, tgt = _attack_problem(10)
  loss = P.untargeted_loss(feats, x, units, src)
  with pytest.raises(ValueError, match="eps"):
    P.pgd(loss, x, eps=0.0, steps=3)
  with pytest.raises(ValueError, match="eps"):
    P.pgd(loss, x, eps=-1 / 255, steps=3)
  with pytest.raises(ValueError, match="steps"):
    P.pgd(loss, x, eps=0.01, steps=0)
  with pytest.raises(ValueError, match="step_size"):
    P.pgd(loss, x, eps=0.01, steps=2, step_size=0.0)
  with pytest.raises(ValueError, match="key"):
    P.pgd(loss, x, eps=0.01, steps=2, random_start=True)
  with pytest.raises(ValueError, match="loss_fn"):
    P.pgd(lambda z: jnp.sum(z), x, eps=0.01, steps=2)
  with pytest.raises(ValueError, match="x must be NHWC"):
    P.pgd(loss, x[0], eps=0.01, steps=2)
  with pytest.raises(ValueError, match="eps"):
    P.make_act_avg_attack(feats, eps=0, steps=3)
  with pytest.raises(ValueError, match="steps"):
    P.make_act_avg_attack(feats, eps=0.01, steps=0)
  with pytest.raises(ValueError, match="objective"):
    P.make_act_avg_attack(feats, eps=0.01, steps=2, objective="bogus")
  with pytest.raises(ValueError, match="loop"):
    P.make_act_avg_attack(feats, eps=0.01, steps=2, loop="while")
  attack = P.make_act_avg_attack(feats, eps=0.01, steps=2)
  with pytest.raises(ValueError, match="target_masks"):
    attack(x, units, src)
  with pytest.raises(ValueError, match="source_masks"):
    attack(x, units, src[:3], tgt)
  with pytest.raises(ValueError, match="target_masks"):
    attack(x, units, src, tgt[:3])
  with pytest.raises(ValueError, match="units"):
    attack(x, units[:3], src, tgt)
  with pytest.raises(ValueError, match="units"):
    P.targeted_loss(feats, x, units.at[0].set(6), src, tgt)
  # The unit range is checked on the host, before anything is jitted, for every loop kind.
  for loop in P.LOOPS:
    a = P.make_act_avg_attack(feats, eps=0.01, steps=1, loop=loop)
    with pytest.raises(ValueError, match=r"units must lie in \[0, 6\)"):
      a(x, units.at[0].set(6), src, tgt)
    with pytest.raises(ValueError, match="units must lie"):
      a(x, units.at[1].set(-1), src, tgt)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda u: P.check_unit_range(u, 6, "f") or u)(units)
  with pytest.raises(ValueError, match="features_fn"):
    P.untargeted_loss(lambda z: z[..., 0], x, units, src)


# ------------------------------------------------------------------------------------------------
# Noise.

def test_select_fraction_exact_and_deterministic():
  for n, frac in [(10, 0.2), (7, 0.5), (100, 1.0), (5, 0.0), (33, 0.3)]:
    m = np.asarray(noise.select_fraction(jax.random.key(0), n, frac))
    assert m.dtype == bool and m.shape == (n,)
    assert m.sum() == int(np.floor(frac * n + 0.5))
    np.testing.assert_array_equal(m, np.asarray(noise.select_fraction(jax.random.key(0), n, frac)))
  a = np.asarray(noise.select_fraction(jax.random.key(1), 1000, 0.5))
  b = np.asarray(noise.select_fraction(jax.random.key(2), 1000, 0.5))
  assert not np.array_equal(a, b)
  with pytest.raises(ValueError, match="fraction"):
    noise.select_fraction(jax.random.key(0), 10, 1.5)
  with pytest.raises(ValueError, match="n must"):
    noise.select_fraction(jax.random.key(0), -1, 0.5)


@pytest.mark.parametrize("kind", noise.NOISE_KINDS)
def test_noise_statistics_clipping_determinism(kind):
  sigma = 0.05
  x = jnp.full((4, 64, 64, 3), 0.5, jnp.float32)
  k = jax.random.key(0)
  y = noise.corrupt(k, x, kind, sigma)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(noise.corrupt(k, x, kind, sigma)))
  assert not np.array_equal(np.asarray(y), np.asarray(noise.corrupt(jax.random.key(1), x, kind,
                                                                    sigma)))
  d = np.asarray(y - x, np.float64)
  expect_std = {"gaussian": sigma, "uniform": sigma / np.sqrt(3), "bernoulli": sigma}[kind]
  assert abs(d.mean()) < 0.02 * sigma
  assert abs(d.std() - expect_std) < 0.02 * expect_std
  if kind != "gaussian":
    assert np.abs(d).max() <= sigma + 1e-7
  if kind == "bernoulli":
    np.testing.assert_allclose(np.abs(d), sigma, rtol=1e-5)
    assert abs(np.mean(d > 0) - 0.5) < 0.01
  # Clipping to [0, 1].
  edge = jnp.asarray(np.random.RandomState(0).choice([0.0, 1.0], (4, 16, 16, 3)), jnp.float32)
  z = np.asarray(noise.corrupt(k, edge, kind, 0.3))
  assert z.min() >= 0.0 and z.max() <= 1.0 and np.any((z > 0) & (z < 1))


def test_corrupt_only_masked_images():
  x = jax.random.uniform(jax.random.key(0), (10, 8, 8, 3))
  k_sel, k_noise = jax.random.split(jax.random.key(1))
  mask = noise.select_fraction(k_sel, 10, 0.3)
  y = np.asarray(noise.corrupt(k_noise, x, "gaussian", 0.05, mask))
  changed = np.any(y != np.asarray(x), axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, np.asarray(mask))
  # Under jit, with kind static.
  yj = jax.jit(noise.corrupt, static_argnames="kind")(k_noise, x, "gaussian", 0.05, mask)
  np.testing.assert_allclose(np.asarray(yj), y, atol=1e-7)
  b = np.asarray(noise.bernoulli_noise(k_noise, jnp.full((1, 64, 64, 3), 0.5), 0.1, p=0.9)) - 0.5
  assert abs(np.mean(b > 0) - 0.9) < 0.02


def test_noise_bad_args():
  x = jnp.zeros((2, 4, 4, 3))
  k = jax.random.key(0)
  with pytest.raises(ValueError, match="kind"):
    noise.corrupt(k, x, "salt", 0.1)
  with pytest.raises(ValueError, match="sigma"):
    noise.gaussian_noise(k, x, -0.1)
  with pytest.raises(ValueError, match="p must"):
    noise.bernoulli_noise(k, x, 0.1, p=1.5)
  with pytest.raises(ValueError, match="mask"):
    noise.corrupt(k, x, "uniform", 0.1, jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="NHWC"):
    noise.uniform_noise(k, x[0], 0.1)


# ------------------------------------------------------------------------------------------------
# fastgrad: forward-preserving rewrite for faster CPU input gradients.

from nemjax.ops import fastgrad  # noqa: E402


def _pool_net(seed=0):
  """Stem conv (7x7/2, 3 channels) -> max-pool 3x3/2 -> strided 3x3 conv -> max-pool 2x2."""
  rng = np.random.RandomState(seed)
  w1 = jnp.asarray(rng.randn(7, 7, 3, 8).astype(np.float32) * 0.2)
  w2 = jnp.asarray(rng.randn(3, 3, 8, 6).astype(np.float32) * 0.2)
  w3 = jnp.asarray(rng.randn(11, 11, 3, 4).astype(np.float32) * 0.1)
  dn = ("NHWC", "HWIO", "NHWC")

  @jax.jit  # nested jit: the rewrite inlines it
  def block(h):
    h = jax.lax.conv_general_dilated(h, w2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    return jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                 (1, 2, 2, 1), "VALID")

  def f(x):
    h = jax.lax.conv_general_dilated(x, w1, (2, 2), ((3, 3), (3, 3)), dimension_numbers=dn)
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    side = jax.lax.conv_general_dilated(x, w3, (4, 4), ((2, 2), (2, 2)), dimension_numbers=dn)
    return {"a": block(h), "b": side}
  return f


def test_fastgrad_same_forward_and_gradients():
  f = _pool_net()
  g = fastgrad.cpu_fast_grad(f)
  x = jax.random.uniform(jax.random.key(0), (2, 45, 47, 3))
  out_f, out_g = jax.jit(f)(x), jax.jit(g)(x)
  for k in ("a", "b"):
    np.testing.assert_array_equal(np.asarray(out_f[k]), np.asarray(out_g[k]))  # bit-identical
  loss = lambda fn: (lambda z: jnp.sum(fn(z)["a"] ** 2) + jnp.sum(jnp.sin(fn(z)["b"])))
  ga = jax.jit(jax.grad(loss(f)))(x)
  gb = jax.jit(jax.grad(loss(g)))(x)
  np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(ga).max()))
  # The rewrite really replaced the slow primitives.
  hlo = jax.jit(jax.grad(loss(g))).lower(x).as_text()
  assert "select_and_scatter" not in hlo
  assert "select_and_scatter" in jax.jit(jax.grad(loss(f))).lower(x).as_text()


def test_fastgrad_max_pool_ties_follow_select_and_scatter():
  x = jnp.asarray(np.random.RandomState(0).randint(0, 3, (2, 11, 12, 3)).astype(np.float32))
  for k, s, p in [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0))),
                  ((3, 2), (1, 3), ((1, 0), (0, 2))),
                  # disjoint windows (k <= s: one broadcast pass), with padding, gaps, leftovers
                  ((2, 2), (3, 3), ((1, 0), (0, 2))), ((1, 2), (2, 2), ((0, 1), (1, 1))),
                  ((3, 3), (3, 3), ((1, 1), (0, 0))), ((2, 3), (2, 3), ((0, 0), (0, 0)))]:
    ref = lambda z: jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1,) + k + (1,),
                                          (1,) + s + (1,), ((0, 0),) + p + ((0, 0),))
    y = ref(x)
    np.testing.assert_array_equal(np.asarray(fastgrad.max_pool(x, k, s, p)), np.asarray(y))
    ct = jax.random.normal(jax.random.key(1), y.shape)
    ga = jax.vjp(ref, x)[1](ct)[0]
    gb = jax.vjp(lambda z: fastgrad.max_pool(z, k, s, p), x)[1](ct)[0]
    np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), atol=1e-6)


def test_fastgrad_strided_conv_weight_grad_and_fallthrough():
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(2, 17, 16, 3).astype(np.float32))
  w = jnp.asarray(rng.randn(5, 5, 3, 4).astype(np.float32))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (3, 2), ((2, 1), (0, 2)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  new = lambda x, w: fastgrad.strided_conv(x, w, (3, 2), ((2, 1), (0, 2)))
  np.testing.assert_array_equal(np.asarray(new(x, w)), np.asarray(ref(x, w)))
  ct = jnp.asarray(rng.randn(*ref(x, w).shape).astype(np.float32))
  for a, b in zip(jax.vjp(ref, x, w)[1](ct), jax.vjp(new, x, w)[1](ct)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)
  # NCHW convolutions are left alone (evaluated unchanged).
  nchw = lambda z: jax.lax.conv_general_dilated(z, jnp.ones((2, 3, 3, 3)), (2, 2), "SAME")
  z = jnp.asarray(rng.randn(1, 3, 9, 9).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(fastgrad.cpu_fast_grad(nchw)(z)), np.asarray(nchw(z)))


@pytest.mark.parametrize("k,strides,padding,hw", [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (9, 8)), ((1, 1), (2, 2), ((0, 0), (0, 0)), (9, 8)),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (7, 10)), ((5, 3), (3, 2), ((2, 0), (0, 3)), (11, 9)),
    ((3, 3), (1, 1), ((0, 0), (0, 0)), (6, 6))])
@pytest.mark.parametrize("flip_activations", [False, True])
def test_fastgrad_conv_hwio_input_grad(k, strides, padding, hw, flip_activations, monkeypatch):
  """``fastgrad.conv``: XLA's forward bit for bit, both VJPs equal to XLA's (any stride,
  asymmetric padding), with the flip on the kernel (small kernels) or on the activations
  (large kernels, forced here)."""
  monkeypatch.setattr(fastgrad, "_flip_activations", lambda *sizes: flip_activations)
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, *hw, 5).astype(np.float32))
  w = jnp.asarray(rng.randn(*k, 5, 7).astype(np.float32))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding,
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  new = lambda x, w: fastgrad.conv(x, w, strides, padding)
  np.testing.assert_array_equal(np.asarray(new(x, w)), np.asarray(ref(x, w)))
  ct = jnp.asarray(rng.randn(*ref(x, w).shape).astype(np.float32))
  for a, b in zip(jax.vjp(ref, x, w)[1](ct), jax.vjp(new, x, w)[1](ct)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)


def test_fastgrad_conv_grads_in_loops_use_hwio_kernels():
  """Inside a ``lax.map`` body, XLA's own input gradient reads the kernel as (kh, kw, O, I)
  (``01oi``: XLA:CPU's slow generic convolution); through the rewrite every convolution of the
  optimised program reads an HWIO kernel, and the gradients agree."""
  rng = np.random.RandomState(4)
  w1 = jnp.asarray(rng.randn(3, 3, 6, 8).astype(np.float32) * 0.2)
  w2 = jnp.asarray(rng.randn(3, 3, 8, 4).astype(np.float32) * 0.2)
  dn = ("NHWC", "HWIO", "NHWC")
  f = lambda z: jnp.sum(jax.lax.conv_general_dilated(
      jax.nn.relu(jax.lax.conv_general_dilated(z, w1, (1, 1), "SAME", dimension_numbers=dn)),
      w2, (2, 2), "SAME", dimension_numbers=dn) ** 2)
  chunks = lambda fn: jax.jit(lambda xs: jax.lax.map(jax.grad(fn), xs))
  xs = jnp.asarray(rng.randn(3, 2, 10, 10, 6).astype(np.float32))
  labels = lambda fn: set(re.findall(r"dim_labels=(\S+?),", chunks(fn).lower(xs).compile().as_text()))
  assert "b01f_01oi->b01f" in labels(f)
  assert labels(fastgrad.cpu_fast_grad(f)) == {"b01f_01io->b01f"}
  np.testing.assert_allclose(np.asarray(chunks(fastgrad.cpu_fast_grad(f))(xs)),
                             np.asarray(chunks(f)(xs)), rtol=1e-5, atol=1e-5)


def test_fastgrad_conv_flips_activations_only_for_large_kernels():
  """The input gradient flips the activations instead of the kernel only for kernels of at least
  2**20 elements (3×3×256×512 up) whose activations are at most four times their size, and
  never for 1×1 kernels."""
  big = 3 * 3 * 512 * 512
  assert fastgrad._flip_activations(big, 9, 2 * 4 * 7 * 7 * 512)        # ResNet18 layer4
  assert not fastgrad._flip_activations(big, 9, 5 * big)                  # huge batch
  assert not fastgrad._flip_activations(3 * 3 * 256 * 256, 9, 1000)      # small kernel
  assert not fastgrad._flip_activations(1 * 1 * 2048 * 2048, 1, 1000)    # 1×1: nothing to flip
