"""Output safety of nemjax.files: umask-following atomic writes, a clear full-disk error that
leaves the previous file intact, the advisory output lock, stale-temp clean-up, output checks
and config diffs that name the differing fields."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from nemjax import files


def test_atomic_writes_follow_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    files.write_json(tmp_path / "a.json", {"x": 1})
    d = files.new_temp_dir(tmp_path / "dest")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
  assert stat.S_IMODE(os.stat(d).st_mode) == 0o750


def test_full_disk_fails_clearly_and_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "results.csv"
  files.atomic_write_text(path, "complete\n")

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(files.OutputError, match="disk is full"):
    files.atomic_write_text(path, "partial")
  assert path.read_text() == "complete\n"
  assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temp file left


def test_output_lock_refuses_a_second_run_and_is_released(tmp_path):
  with files.output_lock(tmp_path / "out"):
    with pytest.raises(files.OutputError, match="another nemjax run"):
      with files.output_lock(tmp_path / "out"):
        pass
  with files.output_lock(tmp_path / "out"):  # released
    pass


def test_remove_stale_temps_removes_only_its_own(tmp_path):
  (tmp_path / "clean").mkdir()
  (tmp_path / "clean" / ".block4_tally.csv.ab1.tmp").write_text("x")
  (tmp_path / ".results.csv.k2j3.tmp").write_text("x")
  (tmp_path / ".ckpt.tmp-abc12").mkdir()
  (tmp_path / ".ckpt.old-xyz9").mkdir()
  (tmp_path / "results.csv").write_text("keep")
  (tmp_path / ".hidden").write_text("keep")
  removed = files.remove_stale_temps(tmp_path)
  assert len(removed) == 4
  assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "clean", "results.csv"]
  assert not list((tmp_path / "clean").iterdir())


def test_check_output_dir(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(files.OutputError, match="--out .* not a directory"):
    files.check_output_dir(tmp_path / "f")
  with pytest.raises(files.OutputError, match="--report-dir .*cannot be created"):
    files.check_output_dir(tmp_path / "f" / "sub", flag="--report-dir")
  with pytest.raises(files.OutputError, match="MiB free"):
    files.check_output_dir(tmp_path / "new", expected_bytes=2**62)
  assert files.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
  assert not (tmp_path / "new").exists()  # checks create nothing
  if os.geteuid() != 0:  # root may write anywhere
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(files.OutputError, match="not writable"):
      files.check_output_dir(ro / "out")


def test_config_diff_names_only_the_differing_fields(tmp_path):
  files.write_json(tmp_path / "config.json", {"config": {"eps": [2, 4], "steps": 10, "seed": 0}})
  with pytest.raises(ValueError) as e:
    files.check_record(tmp_path / "config.json", {"config": {"eps": [2, 4], "steps": 20, "seed": 0}})
  msg = str(e.value)
  assert "config.steps: stored 10, requested 20" in msg and "config.eps" not in msg
  assert "\n" not in msg
