"""Captum-side helpers shared by tests/test_explain.py and benchmarks/explain.py."""
from __future__ import annotations

import torch
from captum._utils.models.model import Model


class WeightedLeastSquares(Model):
  """A Captum interpretable model: float64 weighted least squares with intercept (what
  ``SkLearnLinearRegression`` fits, without scikit-learn), keeping the samples Captum drew in
  ``seen`` so that nemjax can be given the same ones."""

  def __init__(self):
    super().__init__()
    self.seen = []

  def fit(self, train_data, **kwargs):
    z, y, w = next(iter(train_data))
    self.seen.append(z.numpy().copy())
    a = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
    sw = w.double().sqrt()[:, None]
    theta = torch.linalg.lstsq(a * sw, y.double()[:, None] * sw).solution[:, 0]
    self.coef = theta[:-1][None].float()

  def representation(self):
    return self.coef

  def __call__(self, x):
    return x.float() @ self.coef.T
