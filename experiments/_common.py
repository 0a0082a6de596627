"""Shared start-up for the experiment scripts: venv bootstrap, XLA:CPU flags, error reporting."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from tools.bootstrap import ensure_env  # noqa: E402


# XLA:CPU's (experimental) YNNPACK fusions make these CNNs' convolutions slower on x86: turning
# them off gave the forward pass 1.05-1.46x and act-avg PGD +12 % (BENCHMARKS.md). Set only for
# the jaxlib releases it was measured with (an unknown flag would abort XLA), and only when the
# user has not set XLA_FLAGS; NEMJAX_XLA_TUNING=0 turns it off.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
_TUNED_JAXLIB = ("0.10.",)


def set_cpu_xla_flags() -> None:
  """Puts :data:`CPU_XLA_FLAGS` in ``XLA_FLAGS`` (before JAX starts) where it is known to help."""
  if "XLA_FLAGS" in os.environ or os.environ.get("NEMJAX_XLA_TUNING", "1") == "0":
    return
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  if version.startswith(_TUNED_JAXLIB):
    os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS


def bootstrap(extras: tuple[str, ...] = ("experiments",)) -> None:
  """Re-runs the calling script inside the project venv (created on first use, with
  ``nemjax[extras]``), then sets the XLA:CPU flags (:func:`set_cpu_xla_flags`)."""
  ensure_env(extras=extras)
  set_cpu_xla_flags()


def given_flags(argv: Sequence[str] | None) -> set[str]:
  """The ``--flags`` typed on the command line (``argv``, default ``sys.argv[1:]``)."""
  return {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)
          if a.startswith("--")}


def refuse_inapplicable(argv: Sequence[str] | None,
                        rules: Sequence[tuple[str, bool, str]]) -> None:
  """ValueError naming the first flag that was given where it does not apply.

  Args:
    rules: ``(flag, applies, when it applies)`` triples.
  """
  given = given_flags(argv)
  for flag, applies, when in rules:
    if flag in given and not applies:
      raise ValueError(f"{flag} does not apply here: it is for {when}")


EMBEDDED_ONLY = "the embedded default (no --probe/--weights)"
PROBE_ONLY = "your own data (--probe/--weights)"


@contextlib.contextmanager
def locked_output(out: Path, flag: str = "--out") -> Iterator[Path]:
  """Holds the output directory's lock for the run (a second run on it is refused in one line)
  and first removes the temp files a killed earlier run left there.

  Under several processes each takes its own lock (process i > 0: ``.nemjax.<i>.lock``, so the
  processes of one run may share the directory) and nobody writes before every process has
  removed the stale temps (a barrier)."""
  from nemjax import distributed, files  # pylint: disable=import-outside-toplevel
  procs = distributed.current()
  name = files.LOCK_NAME if procs.leader else f".nemjax.{procs.index}.lock"
  with files.output_lock(out, flag=flag, name=name):
    files.remove_stale_temps(out)
    distributed.barrier("nemjax output ready", procs)
    yield Path(out)


def add_process_flags(p: argparse.ArgumentParser) -> None:
  """--coordinator, --num-processes, --process-id: one process of a ``jax.distributed`` run."""
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="several processes (jax.distributed): address of process 0's coordinator, "
                      "the same on every process")
  p.add_argument("--num-processes", type=int, default=1,
                 help="processes of the run (one per host, or several on one machine)")
  p.add_argument("--process-id", type=int, default=0, help="this process's index in [0, N)")


def join_processes(args) -> Any:
  """Joins the ``jax.distributed`` run of the process flags (before anything uses JAX); a bad
  value ends the script with one line naming its flag. Returns ``distributed.Processes``."""
  from nemjax import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.check_launch(args.coordinator, args.num_processes, args.process_id)
  except ValueError as e:
    fail(as_flag_error(e))
  return distributed.initialize(args.coordinator, args.num_processes, args.process_id)


# What a run writes, for the free-space check before it starts (checked with a 1.5x margin):
# tables, summaries, figures and report thumbnails stay within this ...
OUTPUT_BYTES = 64 * 2**20
# ... plus, for a fine-tuning run, the model and its train state (Adam: ~4x the weights).
TRAIN_STATE_FACTOR = 4


def directory_bytes(path: Path | None) -> int:
  """Total size of the files under ``path`` (0 if it does not exist)."""
  if path is None or not Path(path).exists():
    return 0
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_output(out: Path, flag: str = "--out", weights: Path | None = None) -> None:
  """Fails (one line) unless ``out`` is, or can be created as, a writable directory on a disk
  with room for the run's output (:data:`OUTPUT_BYTES`, plus :data:`TRAIN_STATE_FACTOR` times
  the ``weights`` checkpoint for a fine-tuning run)."""
  from nemjax import files  # pylint: disable=import-outside-toplevel
  try:
    files.check_output_dir(
        out, flag=flag,
        expected_bytes=OUTPUT_BYTES + TRAIN_STATE_FACTOR * directory_bytes(weights))
  except files.OutputError as e:
    fail(str(e))


def add_run_flags(p: argparse.ArgumentParser, out: str, out_help: str) -> None:
  """--seed, --out, --cache and --no-progress, as every experiment script has them."""
  p.add_argument("--seed", type=int, default=0,
                 help="seed of every random draw (and of the embedded default)")
  p.add_argument("--out", type=Path, default=Path(out), help=out_help)
  p.add_argument("--cache", type=Path, default=Path("cache/embedded"),
                 help="embedded default cache")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_probe_pass_flags(p: argparse.ArgumentParser) -> None:
  """How a sweep dissects the probe set and delivers corrupted images (``ProbePass``):
  --delivery, --jpeg-quality, --batch-size, --top-fraction, --quantile-method."""
  from nemjax.sweep.config import ProbePass, field_default  # pylint: disable=import-outside-toplevel
  d = lambda name: field_default(ProbePass, name)
  p.add_argument("--delivery", default=d("delivery"),
                 help="how corrupted images reach the model: float, uint8 or jpeg (uint8/jpeg "
                      "also measure the float result and report its survival)")
  p.add_argument("--jpeg-quality", type=int, default=d("jpeg_quality"),
                 help="JPEG quality (1-100) for --delivery jpeg")
  p.add_argument("--batch-size", type=int, default=d("batch_size"),
                 help="probe images per forward pass")
  p.add_argument("--top-fraction", type=float, default=d("top_fraction"),
                 help="η: the top fraction of a unit's activations above its threshold")
  p.add_argument("--quantile-method", default=d("quantile_method"),
                 help="numpy.quantile method of the thresholds")


def probe_pass(args) -> Any:
  """The ``ProbePass`` of the flags of :func:`add_probe_pass_flags` (ValueError: a field's)."""
  from nemjax.sweep.config import ProbePass  # pylint: disable=import-outside-toplevel
  return ProbePass(batch_size=args.batch_size, top_fraction=args.top_fraction,
                   quantile_method=args.quantile_method, delivery=args.delivery,
                   jpeg_quality=args.jpeg_quality)


def add_heldout_flags(p: argparse.ArgumentParser, embedder: bool = True) -> None:
  """The training stream and held-out images of a fine-tuning script with --probe/--weights
  (defaults: ``nemjax.manipulate.config.DataSources``); ``embedder=False``: no --embedder flag
  (``args.embedder`` is the default, the original model's features)."""
  from nemjax.manipulate.config import DataSources  # pylint: disable=import-outside-toplevel
  p.add_argument("--train-folder", type=Path,
                 help="training stream: class-per-subfolder tree (needs --val-folder)")
  p.add_argument("--val-folder", type=Path,
                 help="held-out images (accuracy, α rule): class-per-subfolder tree, sorted "
                      "names = the model's classes; required with --probe")
  p.add_argument("--val-unlabelled", action="store_true",
                 help="--val-folder images carry no class labels: report top-1 agreement with "
                      "the original model on them instead of accuracy")
  p.add_argument("--val-size", type=int,
                 help="use a fixed random subset of this many held-out images (default: all)")
  p.add_argument("--train-eval-size", type=int, default=DataSources.train_eval_size,
                 help="training-stream images whose accuracy is reported as the train accuracy")
  p.add_argument("--normalize", default=DataSources.normalize,
                 choices=["netdissect", "imagenet"], help="input normalisation the model expects")
  if embedder:
    p.add_argument("--embedder", default=DataSources.embedder, metavar="SPEC", help=EMBEDDER_HELP)
  else:
    p.set_defaults(embedder=DataSources.embedder)


HELDOUT_FLAGS = ("--train-folder", "--val-folder", "--val-unlabelled", "--val-size",
                 "--normalize")


def embedded_default(data: Any, seed: int, progress: bool) -> Any:
  """The embedded default, built (once, cached in ``data.cache``) when ``data`` (a
  ``DataSources``) names no probe set; else ``None``."""
  if not data.embedded:
    return None
  from nemjax.embedded import build_embedded_default  # pylint: disable=import-outside-toplevel
  return build_embedded_default(data.cache, seed=seed, progress=progress)


def data_sources(args, **extra) -> Any:
  """The ``DataSources`` of a fine-tuning script's model and held-out flags (``extra``: decoys,
  groups), checked when built (ValueError naming the field)."""
  from nemjax.manipulate.config import DataSources  # pylint: disable=import-outside-toplevel
  return DataSources(
      probe=args.probe, weights=args.weights, normalize=args.normalize,
      train_folder=args.train_folder, val_folder=args.val_folder,
      val_unlabelled=args.val_unlabelled, val_size=args.val_size,
      train_eval_size=args.train_eval_size, embedder=args.embedder, cache=args.cache, **extra)


def make_config(build: Callable[[], Any], flags: dict[str, str] | None = None) -> Any:
  """``build()`` (a script's flags -> its config, every value checked once by the config's
  ``validate``); a ``ValueError`` ends the script with one line naming the flag
  (:func:`as_flag_error`)."""
  try:
    return build()
  except ValueError as e:
    fail(as_flag_error(e, flags))


def run_finetune(args, config: Any, call: Callable[..., Any]) -> Any:
  """What a fine-tuning script does after its config: checks --embedder (loading it) and --out,
  builds the embedded default if it is used, then ``call(default=, embedder=, progress=)``
  (the one library call) under the output lock; a ValueError / FileNotFoundError is one line."""
  embedder = load_embedder_flag(args.embedder)
  check_output(args.out, weights=args.weights)
  progress = not args.no_progress
  default = embedded_default(config.data, config.seed, progress)
  with locked_output(args.out):
    try:
      return call(default=default, embedder=embedder, progress=progress)
    except (ValueError, FileNotFoundError) as e:
      fail(str(e))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """``--help`` keeps the script's docstring as written and shows every flag's default (unless
  the help text already says it, or there is none to show)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    default = action.default
    if (action.option_strings and "default" not in text and default not in (None, False)
        and default is not argparse.SUPPRESS):
      shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
      text += f" (default: {shown})"
    return text


class Terminated(BaseException):
  """Raised in the main thread by SIGTERM, so a run unwinds as it does for Ctrl-C."""


def run(main: Callable[[], Any]) -> NoReturn:
  """Runs a script's ``main()`` and exits with its status; Ctrl-C (SIGINT) and SIGTERM stop it
  cleanly with one line and exit status 130 / 143 (every write is atomic, so the same command
  resumes), and an output that cannot be written (full disk, locked) is one ``error:`` line."""
  from nemjax.files import OutputError  # pylint: disable=import-outside-toplevel

  def on_term(signum, frame):
    raise Terminated()

  signal.signal(signal.SIGTERM, on_term)
  try:
    code = main()
  except KeyboardInterrupt:
    print("interrupted; the same command resumes", file=sys.stderr)
    sys.exit(130)
  except Terminated:
    print("terminated; the same command resumes", file=sys.stderr)
    sys.exit(143)
  except OutputError as e:
    fail(str(e))
  sys.exit(code or 0)


# config fields (nested ones as "group.field") whose flag is not "--" + the field's last name
# with dashes (data.val_size -> --val-size)
FIELD_FLAGS = {"learning_rate": "--lr", "alpha.init": "--alpha-init",
               "alpha.min_alpha": "--alpha-min", "alpha.max_alpha": "--alpha-max",
               "alpha.tolerance": "--alpha-tolerance", "alpha.fixed": "--alpha-fixed",
               "featvis.channels": "--featvis-channels", "featvis.steps": "--featvis-steps"}


def as_flag_error(e: Exception, flags: dict[str, str] | None = None) -> str:
  """A library ValueError ``"field_name: ..."`` as the flag's message ``"--field-name: ..."``
  (:data:`FIELD_FLAGS` and ``flags`` name the flags whose names differ)."""
  head, sep, rest = str(e).partition(": ")
  names = FIELD_FLAGS | (flags or {})
  if sep and head in names:
    return f"{names[head]}: {rest}"
  parts = head.split(".")
  if sep and all(p.isidentifier() and p.islower() for p in parts):
    return f"--{parts[-1].replace('_', '-')}: {rest}"
  return str(e)


class ArgumentParser(argparse.ArgumentParser):
  """A script's parser: ``--help`` with defaults (:class:`HelpFormatter`), and a bad flag is one
  ``error:`` line naming it (exit status 2), without the usage block."""

  def __init__(self, description: str | None = None) -> None:
    super().__init__(description=description, formatter_class=HelpFormatter)

  def error(self, message: str) -> NoReturn:
    fail(message)


def fail(message: str, code: int = 2) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


@dataclasses.dataclass(frozen=True)
class Target:
  """What a script runs on, resolved from --probe / --weights / --arch / --layers before any
  work: the embedded default's paths (nothing built yet) or the user's checkpoint and probe set.
  """
  embedded: bool
  probe_dir: Path
  weights: Path
  arch: str
  layers: tuple[str, ...]    # as given (or the embedded default's), every name checked


def resolve_target(args, default_layers: Sequence[str] | None = None,
                   layer_flag: str = "--layers") -> Target:
  """The one resolution of a script's model flags; ValueError naming the flag (nothing loaded
  but the checkpoint's metadata.json).

  Args:
    args: parsed flags with ``probe``, ``weights`` and (optionally) ``arch``, ``cache``,
      ``seed`` and the layer flag's attribute.
    default_layers: layers of the embedded default when the layer flag is not given (None:
      the embedded default's ``LAYERS``).
    layer_flag: ``--layers`` (a list) or ``--layer`` (one name).
  """
  from nemjax import embedded  # pylint: disable=import-outside-toplevel
  from nemjax.models import checkpoint, registry  # pylint: disable=import-outside-toplevel
  probe, weights = args.probe, args.weights
  if (probe is None) != (weights is None):
    raise ValueError("give both --probe and --weights, or neither (embedded default)")
  given = getattr(args, layer_flag.lstrip("-").replace("-", "_"), None)
  given = [given] if isinstance(given, str) else given
  want_arch = getattr(args, "arch", None)
  if probe is None:
    if want_arch not in (None, embedded.ARCH):
      raise ValueError(f"--arch {want_arch}: the embedded default is {embedded.ARCH!r} "
                       "(give --probe and --weights for another model)")
    try:
      paths = embedded.cache_paths(args.cache, args.seed)
    except ValueError:
      raise ValueError(f"--seed: must be an integer >= 0, got {args.seed}") from None
    probe_dir, weights, arch = paths.probe_dir, paths.checkpoint_dir, embedded.ARCH
    layers = tuple(given or (default_layers if default_layers is not None else embedded.LAYERS))
  else:
    if not weights.exists():
      raise ValueError(f"--weights: checkpoint directory not found: {weights}")
    if not (probe / "index.csv").exists():
      raise ValueError(f"--probe: index.csv not found in {probe}")
    if not given:
      raise ValueError(f"{layer_flag} is required with --weights")
    try:
      arch = checkpoint.read_metadata(weights)["arch"]
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise ValueError(f"--weights {weights}: {e}") from None
    if want_arch is not None and want_arch != arch:
      raise ValueError(f"--arch {want_arch} but the checkpoint --weights holds {arch}")
    probe_dir, layers = probe, tuple(given)
  for name in layers:
    try:
      registry.canonical_layer(arch, name)
    except ValueError as e:
      raise ValueError(f"{layer_flag}: {e}") from None
  return Target(probe is None, Path(probe_dir), Path(weights), arch, layers)


MIN_IOU_HELP = ("eligible units: a clean label with IoU above this (Network Dissection's bar "
                "for an interpretable unit)")


@dataclasses.dataclass
class SweepModel:
  """What a sweep checks its units against before any work: a shape-only model for the
  embedded default (not trained, its probe set not generated), else the loaded checkpoint and
  probe set."""
  model: Any
  probe: Any                 # the ProbeSet, or None for the embedded default
  image_size: tuple[int, int]


def sweep_model(target: Target) -> SweepModel:
  """The :class:`SweepModel` of a resolved target (reads the checkpoint and the probe index)."""
  from nemjax import embedded  # pylint: disable=import-outside-toplevel
  from nemjax.data import broden  # pylint: disable=import-outside-toplevel
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  if target.embedded:
    return SweepModel(embedded.abstract_model(), None, (embedded.IMAGE_SIZE, embedded.IMAGE_SIZE))
  probe = broden.load_probe(target.probe_dir)
  return SweepModel(checkpoint.load(target.weights, arch=target.arch), probe,
                    tuple(probe.image_size))


def run_info(target: Target) -> dict:
  """The run's inputs as ``config.json`` records them (probe, weights, arch)."""
  return {"probe": str(target.probe_dir.resolve()), "weights": str(target.weights.resolve()),
          "arch": target.arch}


def load_sweep_inputs(args, target: Target, checked: SweepModel, progress: bool
                      ) -> tuple[Any, Any]:
  """``(model, probe)`` to run on: builds (once, cached) and loads the embedded default.
  Several processes: process 0 builds it first, the others then load it from a shared
  ``--cache`` (or build their own copy on another host's disk)."""
  if not target.embedded:
    return checked.model, checked.probe
  from nemjax import distributed, embedded  # pylint: disable=import-outside-toplevel
  from nemjax.data import broden  # pylint: disable=import-outside-toplevel
  from nemjax.models import checkpoint  # pylint: disable=import-outside-toplevel
  procs = distributed.current()
  if not procs.leader:
    distributed.barrier("nemjax embedded default built", procs)
  embedded.build_embedded_default(args.cache, seed=args.seed, progress=progress)
  if procs.leader:
    distributed.barrier("nemjax embedded default built", procs)
  return checkpoint.load(target.weights, arch=target.arch), broden.load_probe(target.probe_dir)


def flag_checked(build: Callable[[], Any]) -> Any:
  """``build()`` (a config's constructor); its ``ValueError("field: ...")`` ends the script with
  one line naming the flag (``--field``)."""
  try:
    return build()
  except ValueError as e:
    fail(as_flag_error(e))


def load_embedder_flag(spec: str) -> Any:
  """``--embedder SPEC`` -> the CLIP-δ/W image embedder (``None``: the original model's pooled
  features); a bad spec, path or state dict ends the script with one line naming the flag."""
  from nemjax import metrics  # pylint: disable=import-outside-toplevel
  try:
    return metrics.load_embedder(spec)
  except (ValueError, FileNotFoundError, ImportError, OSError) as e:
    fail(f"--embedder {spec}: {e}")


EMBEDDER_HELP = ("image embedder of CLIP-δ / CLIP-W: 'model' (default: the original model's "
                 "pooled --embed-layer features, a stand-in for CLIP) or 'clip:PATH' (a CLIP "
                 "ViT image tower, e.g. OpenAI's ViT-B-32.pt, from a local state dict: .pt / "
                 ".pth / .npz / .safetensors; 'clip-gelu:PATH' for OpenCLIP models with GELU)")
