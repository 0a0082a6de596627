"""Two processes under ``jax.distributed`` (a localhost coordinator, two CPU devices each) give
bit for bit what one process gives: the dissection's thresholds, tallies, IoU, labels and top
images (all three driver paths), and the rows of both sweeps; a sweep whose process 1 is killed
resumes from the shards to the same rows. The merges that make this exact, the row shards and
the results shards are also checked in this process."""
from __future__ import annotations

import csv
import dataclasses
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

import multihost_worker
from nemjax import distributed
from nemjax.dissect import quantile, tally, topimages
from nemjax.sweep import store

TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
  return env


def _start(argv_of, n: int = 2) -> list[subprocess.Popen]:
  """``n`` processes ``argv_of(coordinator, i)``, each in its own session (killable alone)."""
  coordinator = f"localhost:{_free_port()}"
  return [subprocess.Popen(argv_of(coordinator, i), cwd=REPO, env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True) for i in range(n)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  """Waits for every process (killing all on timeout); asserts each exited 0."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _assert_same(a, b, path: str = "") -> None:
  """Bit-identical nested results (arrays: same dtype, shape and bytes)."""
  if isinstance(a, np.ndarray):
    assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
    assert a.tobytes() == b.tobytes(), path
  elif dataclasses.is_dataclass(a):
    for f in dataclasses.fields(a):
      _assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
  elif isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      _assert_same(a[k], b[k], f"{path}[{k!r}]")
  elif isinstance(a, (list, tuple)):
    assert type(a) is type(b) and len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same(x, y, f"{path}[{i}]")
  else:
    assert a == b, (path, a, b)


def _rows(path: Path) -> list[tuple]:
  """A results.csv's rows in file order, without the timing column."""
  with open(path, newline="") as f:
    return [tuple((k, v) for k, v in r.items() if k != "seconds") for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def single(tiny_probe_dir, tiny_model_dir, tmp_path_factory):
  """The single-process reference (this process, one device): results and output dir."""
  out = tmp_path_factory.mktemp("single")
  return multihost_worker.run_all(tiny_probe_dir, tiny_model_dir, out), out


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(single, tiny_probe_dir, tiny_model_dir,
                                                       tmp_path):
  ref, ref_out = single
  t0 = time.time()
  _finish(_start(lambda coord, i: [sys.executable, str(REPO / "tests/multihost_worker.py"),
                                   coord, "2", str(i), str(tiny_probe_dir), str(tiny_model_dir),
                                   str(tmp_path)]))
  print(f"2 processes: {time.time() - t0:.1f} s")
  for i in (0, 1):  # every process holds the whole, identical result
    got = pickle.loads((tmp_path / f"results.{i}.pkl").read_bytes())
    _assert_same(ref, got, f"process {i}")
  assert got["keep"][1]["block4"].shape[0] == 24  # all rows' activations on every process
  for sweep in ("pgd", "noise"):
    assert _rows(tmp_path / sweep / "results.csv") == _rows(ref_out / sweep / "results.csv")
    assert not list((tmp_path / sweep).glob("results.*.csv"))  # shards merged and removed
    assert (tmp_path / sweep / "summary.json").read_text() == \
        (ref_out / sweep / "summary.json").read_text()
  for f in sorted((ref_out / "pgd" / "clean").iterdir()):  # clean dissection: written once
    assert (tmp_path / "pgd" / "clean" / f.name).read_bytes() == f.read_bytes(), f.name


def _pgd_cli(out: Path, probe: Path, ckpt: Path):
  """The worker's PGD sweep as a 2-process command line (same config, so the same rows)."""
  def argv_of(coord: str, i: int) -> list[str]:
    return [sys.executable, str(REPO / "experiments/pgd_sweep.py"), "--probe", str(probe),
            "--weights", str(ckpt), "--layers", "block4", "--num-units", "2", "--eps", "4", "8",
            "--steps", "2", "--modes", "u2", "--units-per-call", "1", "--batch-size", "8",
            "--out", str(out), "--no-progress", "--coordinator", coord, "--num-processes", "2",
            "--process-id", str(i)]
  return argv_of


@pytest.mark.slow
def test_kill_one_process_then_rerun_resumes_to_the_same_rows(single, tiny_probe_dir,
                                                              tiny_model_dir, tmp_path):
  _, ref_out = single
  out = tmp_path / "pgd"
  argv_of = _pgd_cli(out, tiny_probe_dir, tiny_model_dir)
  procs = _start(argv_of)
  shard = out / "results.1.csv"
  deadline = time.time() + TIMEOUT_S
  try:
    while time.time() < deadline and procs[1].poll() is None:
      if shard.exists() and len(shard.read_text().splitlines()) >= 2:  # header + 1 row
        break
      time.sleep(0.05)
    assert procs[1].poll() is None, procs[1].communicate()[0][-3000:]
    os.killpg(procs[1].pid, signal.SIGKILL)
    try:  # process 0 cannot finish without process 1: it fails (or is killed here)
      procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
      pass
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.communicate()
  assert procs[0].returncode != 0
  partial = _rows(shard)
  assert 1 <= len(partial) < 4 and not (out / "results.csv").exists()
  _finish(_start(argv_of))
  rows = _rows(out / "results.csv")
  assert rows == _rows(ref_out / "pgd" / "results.csv")
  assert set(partial) <= set(rows)
  assert not list(out.glob("results.*.csv"))
  assert (out / "summary.json").exists() and (out / "pgd_sweep.png").exists()


def test_merges_of_disjoint_row_shards_equal_one_stream():
  rng = np.random.default_rng(0)
  acts = np.round(rng.standard_normal((11, 3, 3, 4)), 1).astype(np.float32)  # many ties
  n, parts = len(acts), [np.arange(0, 5), np.arange(5, 5), np.arange(5, 11)]  # one empty
  q = quantile.quantile_of(0.05)
  states = [quantile.threshold_update(quantile.threshold_init(4, n * 9, q), acts[r])
            for r in parts]
  tops = [topimages.top_images_update(topimages.top_images_init(4, 3, (3, 3)), acts[r], r)
          for r in parts]
  merged = states[0]
  for st in states[1:]:
    merged = quantile.threshold_merge(merged, st)
  want = np.quantile(acts.reshape(-1, 4).astype(np.float64), q, axis=0)
  assert quantile.threshold_finalize(merged).tobytes() == want.tobytes()
  top = tops[2]
  for t in (tops[1], tops[0]):  # any order
    top = topimages.top_images_merge(top, t)
  _assert_same(tuple(top), tuple(topimages.top_images_from_acts(acts, 3)))
  a = tally.tally_init(4, 5, 2)._replace(tally_labels=np.arange(5, dtype=np.int64))
  assert tally.tally_merge(a, a).tally_labels.tolist() == [0, 2, 4, 6, 8]
  with pytest.raises(ValueError, match="more values than announced"):
    quantile.threshold_merge(merged, merged)


def test_row_shards_and_work_split_cover_everything_once():
  for n, count in ((24, 2), (5, 3), (2, 3)):
    rows = [distributed.shard_rows(n, distributed.Processes(i, count)) for i in range(count)]
    assert np.concatenate(rows).tolist() == list(range(n))
    work = [distributed.split_work(list(range(7)), distributed.Processes(i, count))
            for i in range(count)]
    assert sorted(sum(work, [])) == list(range(7))
  one = distributed.Processes(0, 1)
  assert distributed.allgather_objects({"a": 1}, one) == [{"a": 1}]
  for bad, field in (((None, 2, 0), "coordinator"), (("h:0", 2, 0), "coordinator"),
                     (("h:1", 0, 0), "num_processes"), (("h:1", 2, 2), "process_id")):
    with pytest.raises(ValueError, match=f"^{field}: "):
      distributed.check_launch(*bad)


def test_single_process_run_folds_in_the_shards_of_a_killed_multi_process_run(tmp_path):
  fields, keys = ["k", "v"], ["k"]
  store.ResultsStore(tmp_path / "results.csv", fields, keys).add([{"k": 1, "v": "a"}])
  store.ResultsStore(store.shard_path(tmp_path, 1), fields, keys).add(
      [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}])
  s = store.open_out_dir(tmp_path, {"x": 1}, fields, keys, distributed.Processes(0, 1))
  assert [r["k"] for r in s.rows] == ["1", "2"] and s.done(k=2)
  assert not store.shard_path(tmp_path, 1).exists()
  assert [r["k"] for r in store.ResultsStore(tmp_path / "results.csv", fields, keys).rows] == \
      ["1", "2"]
