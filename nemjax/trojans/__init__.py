"""Trojans implanted by data poisoning, and their measurement (Casper's trojan benchmark).

- triggers (pure, explicit keys): :class:`Trigger`, :func:`make_patch_trigger`,
  :func:`apply_trigger` (patch pasted at random locations with colour jitter, noise and soft
  edges; returns the per-image trigger masks), :class:`StyleTrigger`,
  :func:`make_style_texture`, :func:`apply_style` (texture blend), :func:`concept_masks`.
- settings (frozen, checked once): :class:`PatchTrojan`, :class:`StyleTrojan`,
  :class:`NaturalTrojan`, :class:`TrojanConfig`, :data:`EMBEDDED_TROJANS`.
- poisoning: :func:`arm` (a trojan's trigger from its name), :func:`poison_batch`.
- measurement (held-out images only): :func:`load_data`, :func:`heldout_sets`,
  :func:`attack_success_rate`, :func:`measure`.
- implantation: :func:`implant` (fine-tune through :func:`nemjax.manipulate.loop.run_loop`,
  resumable), :func:`trojaned_model`.
"""
from nemjax.trojans.config import (EMBEDDED_TROJANS, KINDS, NaturalTrojan, PatchTrojan,
                                   StyleTrojan, TrojanConfig, TrojanSpec, spec_to_json)
from nemjax.trojans.implant import ImplantResult, check_trojans, implant, trojaned_model
from nemjax.trojans.measure import (HeldoutSet, LabelledImages, TrojanData, TrojanMetrics,
                                    TrojanScore, attack_success_rate, heldout_sets, load_data,
                                    load_split, measure)
from nemjax.trojans.poison import Armed, PoisonedBatch, apply_armed, arm, poison_batch
from nemjax.trojans.triggers import (ColourJitter, PatchDraw, StyleTrigger, Trigger,
                                     apply_style, apply_trigger, concept_masks,
                                     concept_presence, draw_patch, make_patch_trigger,
                                     make_style_texture, paste_patch, patch_side,
                                     random_pattern, soft_edge_alpha)

__all__ = [
    "EMBEDDED_TROJANS", "KINDS", "NaturalTrojan", "PatchTrojan", "StyleTrojan",
    "TrojanConfig", "TrojanSpec", "spec_to_json",
    "ImplantResult", "check_trojans", "implant", "trojaned_model",
    "HeldoutSet", "LabelledImages", "TrojanData", "TrojanMetrics", "TrojanScore",
    "attack_success_rate", "heldout_sets", "load_data", "load_split", "measure",
    "Armed", "PoisonedBatch", "apply_armed", "arm", "poison_batch",
    "ColourJitter", "PatchDraw", "StyleTrigger", "Trigger", "apply_style", "apply_trigger",
    "concept_masks", "concept_presence", "draw_patch", "make_patch_trigger",
    "make_style_texture", "paste_patch", "patch_side", "random_pattern", "soft_edge_alpha",
]
