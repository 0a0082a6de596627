"""The synthesis benchmark: each feature-synthesis tool's images for each trojan, scored by the
8-way multiple choice (:func:`nemjax.synthesis.multiple_choice_batch`).

Per trojan (keys folded from the seed, the tool's and the trojan's names) and tool:

* ``adversarial_patch``: a universal patch (``patch_size``) pasted on clean held-out images;
* ``visualize_target``: feature visualisation of the target logit (``featvis_size``);
* ``tabor``: TABOR's reconstructed trigger, ``mask · pattern``, full image;
* ``snafue``: the ``snafue_k`` crops of clean held-out images (grid of ``patch_size`` crops,
  stride half a patch) nearest, in the embedder's space, to the adversarial patch.

The options of trojan ``t``: its trigger (a patch trojan's pattern, a style trojan's texture)
and 7 distractors: the other trojans' triggers, then random patch patterns
(:func:`nemjax.trojans.random_pattern`, ``random_distractors`` of them drawn once) picked by a
keyed permutation. Every option and synthesised image is resized to 64×64 and embedded by the
*original* (clean) model's pooled ``embedder_layer`` features
(:func:`nemjax.metrics.clip.penultimate_embedder`, the stand-in for CLIP: no download);
the credit is 1 when the true trigger is the most similar option (chance 0.125).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemjax import synthesis
from nemjax.metrics.clip import Embedder
from nemjax.synthesis import choice
from nemjax.trojans import triggers as tr
from nemjax.trojans.bench.config import SynthesisSettings
from nemjax.trojans.poison import Armed

__all__ = ["OPTION_SIZE", "trigger_image", "option_sets", "synthesize", "score_tools"]

OPTION_SIZE = 64


def _resize(images: Any) -> np.ndarray:
  x = jnp.asarray(images, jnp.float32)
  return np.asarray(jax.image.resize(x, x.shape[:-3] + (OPTION_SIZE, OPTION_SIZE, 3), "linear"))


def _key(key: jax.Array, *names: str) -> jax.Array:
  for n in names:
    key = jax.random.fold_in(key, zlib.crc32(n.encode()))
  return key


def trigger_image(a: Armed) -> np.ndarray:
  """What a person is shown for trojan ``a``: ``(64, 64, 3)`` (patch pattern or texture)."""
  if isinstance(a.trigger, tr.Trigger):
    return _resize(a.trigger.pattern)
  if isinstance(a.trigger, tr.StyleTrigger):
    return _resize(a.trigger.texture)
  raise ValueError(f"trojans.{a.spec.name}: a natural-feature trojan has no trigger image")


def option_sets(armed: Sequence[Armed], settings: SynthesisSettings, key: jax.Array
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(true (T, 64, 64, 3), distractors (T, 7, 64, 64, 3))`` (see the module docstring)."""
  true = np.stack([trigger_image(a) for a in armed])
  side = int(armed[0].trigger.pattern.shape[0]) if isinstance(armed[0].trigger, tr.Trigger) else 56
  pool = np.stack([_resize(tr.random_pattern(_key(key, "distractor", str(i)), side))
                   for i in range(settings.random_distractors)]) if settings.random_distractors \
      else np.zeros((0,) + true.shape[1:], np.float32)
  need = choice.NUM_OPTIONS - 1
  dis = []
  for t, a in enumerate(armed):
    others = [true[j] for j in range(len(armed)) if j != t][:need]
    perm = np.asarray(jax.random.permutation(_key(key, "options", a.spec.name), len(pool)))
    dis.append(np.stack(others + [pool[i] for i in perm[:need - len(others)]]))
  return true, np.stack(dis)


def synthesize(tool: str, apply01: Callable, params: Any, a: Armed, images: np.ndarray,
               embedder: Embedder, settings: SynthesisSettings, key: jax.Array) -> np.ndarray:
  """``tool``'s images ``(S, h, w, 3)`` in [0, 1] for trojan ``a``.

  Args:
    apply01: ``(params, images in [0, 1]) -> logits`` of the trojaned model (hashable: one
      closure for every call).
    images: ``(n, H, W, 3)`` clean held-out images in [0, 1].
    embedder: SNAFUE's nearest-neighbour space.
  """
  target, k = a.spec.target, _key(key, tool, a.spec.name)
  bs = min(settings.batch_size, len(images))
  if tool in ("adversarial_patch", "snafue"):
    patch = synthesis.adversarial_patch(apply01, params, images, target,
                                        _key(key, "adversarial_patch", a.spec.name),
                                        patch_size=settings.patch_size, steps=settings.steps,
                                        batch_size=bs)
    if tool == "adversarial_patch":
      return np.asarray(patch)[None]
    cands, _ = synthesis.natural_patches(images[:settings.snafue_images], settings.patch_size,
                                         max(1, settings.patch_size // 2))
    res = synthesis.snafue(embedder, np.asarray(patch)[None], cands,
                           k=min(settings.snafue_k, len(cands)))
    return np.asarray(res.patches)
  if tool == "visualize_target":
    return np.asarray(synthesis.visualize_target(apply01, params, target, k,
                                                 size=settings.featvis_size,
                                                 steps=settings.steps))[None]
  if tool == "tabor":
    return np.asarray(synthesis.tabor(apply01, params, images, target, k, steps=settings.steps,
                                      batch_size=bs).image)[None]
  raise ValueError(f"synthesis.tools: unknown tool {tool!r}")


def score_tools(synthesized: dict[str, list[np.ndarray]], true: np.ndarray,
                distractors: np.ndarray, embedder: Embedder) -> dict[str, np.ndarray]:
  """``{tool: (T,) credits}`` of the 8-way choice (options from :func:`option_sets`)."""
  out = {}
  for tool, sets in synthesized.items():
    s = max(len(x) for x in sets)
    batch = np.stack([_resize(np.concatenate([x, np.repeat(x[-1:], s - len(x), 0)]))
                      for x in sets])        # (T, S, 64, 64, 3); short sets repeat their last
    out[tool] = np.asarray(synthesis.multiple_choice_batch(embedder, batch, true, distractors))
  return out
