"""Names, units and defaults said once (read from the source, no imports): the top fraction
η's default lives only in dissect/quantile.py, perturbation sizes are scaled to and from /255
only in preprocess.py, and a learning rate's default only in the fine-tuning config."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "nemjax").rglob("*.py"), *(REPO / "experiments").glob("*.py")])


def _code_nodes(path: Path):
  """Every AST node of ``path`` outside docstrings (docstrings may quote the values)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  docstrings = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
      docstrings.add(id(body[0].value))
  return [n for n in ast.walk(tree) if id(n) not in docstrings]


def _where(path: Path, node: ast.AST) -> str:
  return f"{path.relative_to(REPO)}:{node.lineno}"


def _names_in(node: ast.AST) -> str:
  return " ".join(n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
                  if isinstance(n, (ast.Name, ast.Attribute))).lower()


def test_top_fraction_default_has_one_home():
  home = REPO / "nemjax/dissect/quantile.py"
  found = [_where(p, n) for p in SOURCES if p != home for n in _code_nodes(p)
           if isinstance(n, ast.Constant) and n.value in (0.005, 0.995)]
  assert not found, f"η (0.005) or q (0.995) written outside dissect/quantile.py: {found}"


_IMAGES = ("img", "image", "images", "x", "x01", "pixels")  # 0..1 <-> 0..255 image conversions


def test_perturbation_sizes_are_scaled_by_255_only_in_preprocess():
  home = REPO / "nemjax/preprocess.py"
  found = []
  for p in SOURCES:
    if p == home:
      continue
    for n in _code_nodes(p):
      if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Mult, ast.Div)):
        sides = (n.left, n.right)
        other = [s for s in sides if not (isinstance(s, ast.Constant) and s.value in (255, 255.0))]
        if len(other) == 1 and isinstance(other[0], (ast.Name, ast.Attribute, ast.Subscript)) \
            and _names_in(other[0]).split()[-1] not in _IMAGES:
          found.append(f"{_where(p, n)} {ast.unparse(n)}")
  assert not found, f"a size scaled by 255 outside preprocess.py (use eps_to_255 / eps_from_255): {found}"


@pytest.mark.parametrize("word", ["quantile"])
def test_no_flag_calls_eta_a_quantile(word):
  """η is --top-fraction; --quantile-method (a numpy.quantile method) is the only such flag."""
  found = [_where(p, n) for p in (REPO / "experiments").glob("*.py") for n in _code_nodes(p)
           if isinstance(n, ast.Constant) and n.value == f"--{word}"]
  assert not found, found


# Where each learning-rate default is written: the papers' fine-tuning rate
# (manipulate/train.py), the experiments' schedules built on it (manipulate/config.py), the
# fooling and trojan schedules (fooling/config.py, trojans/config.py) and the
# embedded default's training recipe (embedded.py) and feature visualisation's image step
# (manipulate/featvis.py, once there).
_LR_HOMES = {"nemjax/manipulate/train.py", "nemjax/manipulate/config.py", "nemjax/embedded.py",
             "nemjax/manipulate/featvis.py", "nemjax/fooling/config.py",
             "nemjax/trojans/config.py"}


def _is_lr(name: str) -> bool:
  name = name.lower()
  return name in ("lr", "--lr") or "learning_rate" in name or name.endswith("_lr")


def test_learning_rate_defaults_have_one_home():
  found = []
  for p in SOURCES:
    if str(p.relative_to(REPO)) in _LR_HOMES:
      continue
    for n in _code_nodes(p):
      bound = []
      if isinstance(n, ast.keyword) and n.arg and _is_lr(n.arg):
        bound.append(n.value)
      if isinstance(n, (ast.Assign, ast.AnnAssign)):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target]
        if any(_is_lr(ast.unparse(t).split(".")[-1]) for t in targets) and n.value is not None:
          bound.append(n.value)
      if isinstance(n, ast.arguments):
        args = [*n.posonlyargs, *n.args, *n.kwonlyargs]
        defaults = [*([None] * (len(n.posonlyargs) + len(n.args) - len(n.defaults))),
                    *n.defaults, *n.kw_defaults]
        bound += [d for a, d in zip(args, defaults) if d is not None and _is_lr(a.arg)]
      found += [_where(p, v) for v in bound
                if any(isinstance(c, ast.Constant) and isinstance(c.value, float)
                       for c in ast.walk(v))]
  assert not found, f"a learning-rate literal outside {sorted(_LR_HOMES)}: {found}"
