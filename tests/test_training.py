"""Tests for nemjax.training: concept targets, the balanced loss, and a classifier trained with
training-only concept heads (fast: a 64-pixel SmallCNN, a few steps)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemjax.models import build
from nemjax.training import ConceptTask, concept_targets, fit_classifier
from nemjax.training.concepts import balanced_bce, concept_loss, init_heads, tied_mask


def test_concept_targets_are_covered_fractions():
  pixels = np.zeros((1, 2, 4, 4), np.int32)     # (N, K, sh, sw): two label layers
  pixels[0, 0, :2, :2] = 7                      # top-left cell fully 7
  pixels[0, 0, 2, 2] = 7                        # a quarter of the bottom-right cell
  pixels[0, 1, 0, 2:] = 9                       # half of the top-right cell, second layer
  pixels[0, 1, 0, 0] = 7                        # 7 in both layers counts once
  t = concept_targets(pixels, [7, 9, 11], out_size=2)
  assert t.shape == (1, 2, 2, 3) and t.dtype == np.float32
  np.testing.assert_allclose(t[0, :, :, 0], [[1.0, 0.0], [0.0, 0.25]])
  np.testing.assert_allclose(t[0, :, :, 1], [[0.0, 0.5], [0.0, 0.0]])
  assert not t[..., 2].any()
  with pytest.raises(ValueError, match="multiple"):
    concept_targets(pixels, [7], out_size=3)


def test_balanced_bce_weighs_rare_concepts_like_common_ones():
  targets = np.zeros((100, 2), np.float32)
  targets[:2, 0] = 1       # rare concept
  targets[:50, 1] = 1      # common concept
  logits = jnp.zeros((100, 2))                  # the same uninformed prediction for both
  np.testing.assert_allclose(balanced_bce(logits, targets), [np.log(2)] * 2, rtol=1e-5)
  perfect = jnp.where(targets > 0, 20.0, -20.0)
  assert float(balanced_bce(perfect, targets).max()) < 1e-6


def test_nonneg_heads_read_units_through_softplus():
  heads = init_heads(jax.random.key(0), {"a": (8, 3)}, nonneg=True)
  acts = {"a": jnp.ones((2, 4, 4, 8))}
  targets = {"a": jnp.zeros((2, 4, 4, 3))}
  plain = concept_loss(acts, heads, targets, nonneg=True)
  flipped = {"a": {"w": -heads["a"]["w"] - 100.0, "b": heads["a"]["b"]}}  # softplus ≈ 0
  assert float(concept_loss(acts, flipped, targets, nonneg=True)) < float(plain)
  assert float(concept_loss(acts, heads, targets, l1=1.0, nonneg=True)) > float(plain)


def test_tied_heads_train_only_their_own_units():
  np.testing.assert_array_equal(tied_mask(5, 2, 2), [[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
  with pytest.raises(ValueError, match="need 6 units"):
    tied_mask(5, 3, 2)
  heads = init_heads(jax.random.key(0), {"a": (6, 2)}, nonneg=True, tied=2)
  acts = jnp.asarray(np.random.default_rng(0).random((2, 3, 3, 6)), jnp.float32)
  targets = {"a": jnp.asarray(np.random.default_rng(1).random((2, 3, 3, 2)), jnp.float32)}
  grad = jax.grad(lambda a: concept_loss({"a": a}, heads, targets, nonneg=True, balanced=True,
                                         tied=2))(acts)
  per_unit = np.abs(np.asarray(grad)).sum(axis=(0, 1, 2))
  assert (per_unit[:4] > 0).all() and (per_unit[4:] == 0).all()


def test_fit_classifier_with_concept_heads_keeps_the_model_layout():
  rng = np.random.default_rng(0)
  n = 8
  images = rng.normal(size=(n, 64, 64, 3)).astype(np.float32)
  labels = np.arange(n) % 2
  pixels = rng.integers(0, 3, (n, 1, 32, 32)).astype(np.int32)
  task = ConceptTask({"block4": concept_targets(pixels, [1, 2], 4),
                      "block3": concept_targets(pixels, [1], 8)},
                     weight=1.0, nonneg=True, balanced=True, tied=3)
  model = build("smallcnn", num_classes=2, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

  def hflip(key, batch):  # flips the images and their targets together
    x = batch[0]
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jax.tree.map(lambda a: jnp.where(flip, a[:, :, ::-1], a), batch)

  trained, history = fit_classifier(model, images, labels, key=jax.random.key(1), epochs=2,
                                    batch_size=4, optimizer=optax.adam(1e-2), augment=hflip,
                                    concepts=task, progress=False)
  assert len(history) == 2 and all(np.isfinite(history))
  after = jax.tree.map(np.asarray, nnx.state(trained, nnx.Param))
  assert jax.tree.structure(after) == jax.tree.structure(before)   # heads are not kept
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert any(changed)
  bad = ConceptTask({"block4": concept_targets(pixels, [1, 2], 8)}, weight=1.0)
  with pytest.raises(ValueError, match="block4"):
    fit_classifier(model, images, labels, key=jax.random.key(1), epochs=1, batch_size=4,
                   optimizer=optax.adam(1e-2), concepts=bad, progress=False)
