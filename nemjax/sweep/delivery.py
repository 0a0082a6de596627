"""How poisoned images reach the dissector: as floats, as uint8 pixels, or as JPEG files."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

DELIVERY_MODES = ("float", "uint8", "jpeg")


def to_uint8(x01: np.ndarray) -> np.ndarray:
  """(…, 3) floats in [0, 1] -> uint8 by rounding to the nearest level."""
  return np.clip(np.rint(np.asarray(x01, np.float64) * 255.0), 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
  """Encodes one (H, W, 3) uint8 image as JPEG with fixed settings (deterministic)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0)
  return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def deliver(x01: np.ndarray, mode: str = "float", quality: int = 90) -> np.ndarray:
  """Poisoned images as the dissector sees them, on the 0..255 scale.

  Args:
    x01: (P, H, W, 3) float in [0, 1].
    mode: 'float' (the attacker's exact floats, ×255, float32), 'uint8' (rounded to 8-bit
      levels) or 'jpeg' (8-bit, then JPEG-encoded at ``quality`` and decoded).
  Returns:
    (P, H, W, 3): float32 for 'float', uint8 otherwise.
  """
  if mode not in DELIVERY_MODES:
    raise ValueError(f"delivery mode must be one of {DELIVERY_MODES}, got {mode!r}")
  if not 1 <= int(quality) <= 100:
    raise ValueError(f"JPEG quality must lie in [1, 100], got {quality}")
  x01 = np.asarray(x01)
  if mode == "float":
    return (x01.astype(np.float32) * np.float32(255.0)).astype(np.float32)
  q = to_uint8(x01)
  if mode == "uint8":
    return q
  return np.stack([decode_jpeg(jpeg_bytes(img, quality)) for img in q]) if len(q) else q
