"""Faults and bad inputs (issue 16): one run per workdir, a clean stop on SIGTERM / SIGINT, metrics once per step
after resume, caches that heal, local files read by content, inputs checked against each other before anything
runs, readable data errors, judges without a scoring head, repeated model names. Checkpoint integrity:
test_checkpoint.py; SIGTERM then resume end to end: test_trainer.py, beside the SIGKILL test.
"""

import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import cache, config_lib, evaluator, judges, logger, reference, runguard, trainer
from jaxalign.data import hh, layouts, pipeline, tokenize
from jaxalign.data.synthetic import write_jsonl
from jaxalign.models import hub, opt
from helpers import REPO, config_file, tiny_config, train_cli

P = "\n\nHuman: How do I bake bread?\n\nAssistant:"
GOOD = {"chosen": P + " Mix flour and water.", "rejected": P + " No idea."}


@pytest.fixture(scope="module")
def tiny_lm() -> opt.OPTForCausalLM:
  """A random 1-layer OPT for the tiny tokenizer, initialised in one compiled program (eagerly: seconds)."""
  config = opt.OPTConfig(vocab_size=384, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                         word_embed_proj_dim=16, max_position_embeddings=64)
  make = lambda: opt.OPTForCausalLM(config, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


# ------------------------------------------------------------------------------------------- one run per workdir

# Holds the lock of the workdir argv[1] until killed.
_HOLDER = textwrap.dedent("""
  import sys, time
  from jaxalign import runguard
  lock = runguard.lock_workdir(sys.argv[1])
  print("locked", flush=True)
  time.sleep(600)
""")


def test_second_run_in_a_workdir_fails_at_once_naming_the_holder_and_a_dead_holder_never_blocks(cache_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    start = time.perf_counter()
    with pytest.raises(runguard.WorkdirBusyError, match=rf"in use by another training run \(host \S+, pid "
                                                         rf"{holder.pid}, started 20\d\d-"):
      trainer.train(tiny_config(cache_dir, "sft"), str(workdir))
    assert time.perf_counter() - start < 5  # at once: before any data or model
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died without releasing anything: its lock went with it.
  with runguard.lock_workdir(str(workdir)):
    assert f"pid {os.getpid()}," in (workdir / runguard.LOCK_FILE).read_text()
  with runguard.lock_workdir(str(workdir)):  # released on exit from the block
    pass


# ----------------------------------------------------------------------------------------------------- preemption


def test_first_signal_requests_a_stop_and_a_second_exits_at_once():
  before = signal.getsignal(signal.SIGINT)
  with runguard.StopSignals(kept=lambda: "checkpoint step 7 is committed in /w") as stop:
    with stop.polling("training"):
      assert not stop.should_stop(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.received == "SIGINT" and stop.should_stop(2)
      with pytest.raises(runguard.Preempted, match=r"^stopped by second signal \(SIGTERM\) while training: checkpoint "
                                                   r"step 7 is committed in /w; rerun the same command to resume$"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_outside_the_loop_a_signal_stops_at_once():
  with runguard.StopSignals() as stop:
    stop.phase = "loading the model"
    with pytest.raises(runguard.Preempted) as stopped:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert stopped.value.code == runguard.PREEMPTED_EXIT_CODE
  assert str(stopped.value) == "stopped by SIGINT while loading the model: nothing was saved; rerun the same command " \
                               "to resume"


# Runs a stage whose function argv[1].argv[2] first sends itself the signal argv[3] (a signal arriving then).
_SIGNAL_DURING = textwrap.dedent("""
  import os, runpy, signal, sys
  from jaxalign import stage_model, trainer
  from jaxalign.data import pipeline
  module = {"pipeline": pipeline, "stage_model": stage_model}[sys.argv[1]]
  original, signum = getattr(module, sys.argv[2]), getattr(signal, sys.argv[3])
  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return original(*args, **kwargs)
  setattr(module, sys.argv[2], interrupted)
  trainer.run(runpy.run_path(sys.argv[4])["get_config"](), sys.argv[5])
""")


@pytest.mark.parametrize("where, signum, message", [
    ("pipeline.load", "SIGTERM", "stopped by SIGTERM while loading and tokenizing the data: no checkpoint is committed "
                                 "in {checkpoints}; rerun the same command to resume"),
    ("stage_model.build_model", "SIGINT", "stopped by SIGINT while loading the model: no checkpoint is committed in "
                                      "{checkpoints}; rerun the same command to resume"),
    ("stage_model.export_model", "SIGTERM", "stopped by SIGTERM while exporting the model: checkpoint step 4 is committed "
                                        "in {checkpoints}; rerun the same command to resume"),
], ids=["data", "model", "export"])
def test_a_signal_at_any_moment_of_the_stage_exits_75_saying_what_was_kept(cache_dir, tmp_path, where, signum,
                                                                            message):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-c", _SIGNAL_DURING, *where.split("."), signum,
                         config_file(tmp_path, tiny_config(cache_dir, "sft")), str(workdir)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == runguard.PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
  assert message.format(checkpoints=workdir / "checkpoints") in proc.stderr
  assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
  if where == "stage_model.export_model":  # the rerun resumes at the last step and exports
    trainer.run(tiny_config(cache_dir, "sft"), str(workdir))
    assert json.load(open(workdir / trainer.DONE_FILE))["steps"] == 4


def test_the_stop_step_has_its_metrics_record_and_a_second_signal_names_the_committed_checkpoint(cache_dir, tmp_path,
                                                                                               monkeypatch):
  signals = {2: [signal.SIGTERM]}  # when step 2's record is written: the loop stops after step 3
  original = logger.MetricLogger.train_step

  def train_step(self, step, *args):
    for signum in signals.get(step, []):
      os.kill(os.getpid(), signum)
    return original(self, step, *args)

  monkeypatch.setattr(logger.MetricLogger, "train_step", train_step)
  workdir = tmp_path / "run"
  config = tiny_config(cache_dir, "sft", **{"training.log_every": 2})
  with pytest.raises(runguard.Preempted, match=r"stopped by SIGTERM after step 3 of 4: checkpoint step 3 saved"):
    trainer.run(config, str(workdir))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 3]  # the stop step's record, written before it
  signals.clear()
  signals[4] = [signal.SIGTERM, signal.SIGINT]  # before step 4's checkpoint
  config.training.max_steps = 6
  with pytest.raises(runguard.Preempted, match=rf"^stopped by second signal \(SIGINT\) while training: checkpoint step "
                                               rf"3 is committed in {workdir}/checkpoints; rerun"):
    trainer.run(config, str(workdir))


def test_a_resumed_run_keeps_the_records_through_its_checkpoint_only(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 8)]
  path.write_text("".join(lines) + '{"step": 8, "train/lo')  # a kill mid-write
  logger.keep_records_through(str(path), 5)
  assert path.read_text() == "".join(lines[:5])
  logger.keep_records_through(str(path), 0)  # a fresh start in a workdir without checkpoints
  assert path.read_text() == ""


# --------------------------------------------------------------------------------------------------------- caches


def _damage(path, how: str) -> None:
  data = bytearray(open(path, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 2]
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_tokenization_cache_is_logged_deleted_and_rebuilt(tiny_tokenizer, tmp_path, caplog, how):
  pairs, _ = hh.load_preference_pairs(str(write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)))
  settings = dict(max_length=32, max_prompt_length=16, cache_dir=tmp_path / "cache")
  fresh = tokenize.tokenize_pairs(pairs, tiny_tokenizer, **settings)
  (entry,) = (tmp_path / "cache").iterdir()
  _damage(entry, how)
  with caplog.at_level(logging.WARNING):
    again = tokenize.tokenize_pairs(pairs, tiny_tokenizer, **settings)
  assert f"damaged tokenization cache {entry}" in caplog.text and "deleting it and rebuilding" in caplog.text
  for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
    assert [a.tolist() for a in getattr(again, name)] == [a.tolist() for a in getattr(fresh, name)]
  caplog.clear()
  with caplog.at_level(logging.INFO):
    tokenize.tokenize_pairs(pairs, tiny_tokenizer, **settings)
  assert "loaded from cache" in caplog.text and "damaged tokenization" not in caplog.text  # rebuilt whole


def test_damaged_reference_logps_cache_is_rebuilt(tiny_lm, tiny_tokenizer, tmp_path, caplog):
  config = tiny_config(str(tmp_path / "cache"), "dpo", **{"data.buckets": (32,), "data.max_length": 32,
                                                           "data.max_prompt_length": 16})
  pairs, _ = hh.load_preference_pairs(str(write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)))
  tokenized = tokenize.tokenize_pairs(pairs, tiny_tokenizer, max_length=32, max_prompt_length=16)
  model = tiny_lm
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  split = pipeline.Split(layouts.pair_layout(config.data, scored=True), tokenized, pairs)
  fresh = reference.cached_logps(model, split, config, mesh, tiny_tokenizer.pad_token_id)
  (entry,) = (tmp_path / "cache" / "reference").iterdir()
  _damage(entry, "flip")
  with caplog.at_level(logging.WARNING):
    again = reference.cached_logps(model, split, config, mesh, tiny_tokenizer.pad_token_id)
  assert f"damaged reference log-prob cache {entry}" in caplog.text
  np.testing.assert_array_equal(again, fresh)
  assert cache.read(entry, cache.npz_arrays) is not None  # rebuilt whole


def test_cache_entries_are_verified_and_written_atomically(tmp_path):
  path = tmp_path / "entry"
  cache.write(path, b"payload")
  assert cache.read(path, bytes) == b"payload" and os.listdir(tmp_path) == ["entry"]  # no temporary left
  path.write_bytes(path.read_bytes().replace(b"payload", b"paylaod"))
  assert cache.read(path, bytes) is None and not path.exists()
  assert cache.read(tmp_path / "absent", bytes) is None


def test_a_replaced_local_file_is_read_anew_even_with_the_old_modification_time(tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
  stat = os.stat(path)
  assert hh.load_preference_pairs(str(path))[0][0].chosen == " Mix flour and water."
  # Same size, same times: only the content tells the files apart.
  write_jsonl(path, [{"chosen": P + " Mix flour and sugar.", "rejected": P + " No idea."}])
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert hh.load_preference_pairs(str(path))[0][0].chosen == " Mix flour and sugar."


# ---------------------------------------------------------------------------------- inputs checked against each other


@pytest.mark.parametrize("overrides, message", [
    ({"model.arch.vocab_size": 512}, r"config.tokenizer = 'synthetic' has 1024 token ids but the model "
                                     r"\(model.preset/arch\) has vocab_size 512"),
    ({"data.max_length": 256, "data.max_prompt_length": 64},
     r"config.data.max_length = 256 is more than the 160 positions"),
    ({"mesh.num_devices": 64}, r"config.mesh.num_devices = 64 but only \d+ device\(s\) are present"),
    ({"init_from": "runs/no-such-run"}, r"config.init_from = 'runs/no-such-run' is neither an existing local folder"),
], ids=["vocab", "positions", "devices", "init_from"])
def test_inputs_are_checked_against_each_other_before_data_is_tokenized(tmp_path, overrides, message):
  config = tiny_config(str(tmp_path / "cache"), "sft", **overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    trainer.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "cache" / "tokenized").exists()  # nothing tokenized, so nothing compiled either


# ------------------------------------------------------------------------------------------------------ data errors


def _lines(tmp_path, name: str, data: bytes):
  path = tmp_path / name
  path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  return path


def test_bad_json_lines_are_skipped_counted_and_named_with_their_line(tmp_path, caplog):
  good = json.dumps(GOOD).encode()
  path = _lines(tmp_path, "mixed.jsonl", b"\n".join([good, b"{not json", good, b"", b"[1, 2]", b'{"chosen": "\xff"}',
                                                     good]) + b"\n")
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    pairs, report = hh.load_preference_pairs(str(path))
  assert len(pairs) == 3 and report.total == 6  # the blank line is not a record
  assert dict(report.skipped) == {hh.MALFORMED_LINE: 2, hh.INVALID_UTF8: 1}
  assert f"{path}:2: skipped, not valid JSON" in caplog.text
  assert f"{path}:5: skipped, a JSON list, expected an object" in caplog.text
  assert f"{path}:6: skipped, not UTF-8" in caplog.text


@pytest.mark.parametrize("name, data, message", [
    ("empty.jsonl", b"", r"empty.jsonl: no records \(the file is empty\); expected JSON lines"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl: no records"),
    ("cut.jsonl.gz", None, r"cut.jsonl.gz: the gzip stream is truncated or corrupt after line \d+"),
    ("notgz.jsonl.gz", b"plain text", r"notgz.jsonl.gz: the gzip stream is truncated or corrupt"),
], ids=["empty", "blank", "truncated-gz", "not-gz"])
def test_unreadable_files_are_refused_naming_the_file(tmp_path, name, data, message):
  if data is None:  # a download cut short
    whole = gzip.compress(b"".join(json.dumps(GOOD).encode() + b"\n" for _ in range(200)))
    path = tmp_path / name
    path.write_bytes(whole[:len(whole) // 2])
  else:
    path = tmp_path / name
    path.write_bytes(data)
  with pytest.raises(ValueError, match=message):
    hh.load_preference_pairs(str(path))


def test_a_source_with_most_records_skipped_warns_loudly(tmp_path, caplog):
  path = write_jsonl(tmp_path / "odd.jsonl", [GOOD] + [{"chosen": P + " same", "rejected": P + " same"}] * 3)
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    hh.load_preference_pairs(str(path))
  assert "3 of its 4 records (75%, more than data.warn_skipped_share = 50%) were SKIPPED" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    hh.load_preference_pairs(str(path), warn_skipped_share=0.8)
  assert "SKIPPED" not in caplog.text


# ------------------------------------------------------------------------------------------ judges, evaluation


def test_a_plain_language_model_is_refused_as_a_judge(tiny_lm, tiny_tokenizer, tmp_path):
  hub.save_pretrained(tiny_lm, str(tmp_path))
  tiny_tokenizer.save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r"cannot be a judge: it has no trained scoring head \(no 'score.weight' "
                                       r"tensor\). Found architectures \['OPTForCausalLM'\]"):
    judges.load_judge(str(tmp_path))


def test_repeated_model_names_are_rejected():
  with pytest.raises(ValueError, match=r"config.models: the name 'sft' is given twice \('runs/a' and 'runs/b'\)"):
    evaluator.parse_named("base=facebook/opt-350m,sft=runs/a, sft=runs/b", "models")
  assert evaluator.parse_named("a=x,b=y", "models") == {"a": "x", "b": "y"}


def test_a_truncated_safetensors_file_is_named(tiny_lm, tmp_path):
  hub.save_pretrained(tiny_lm, str(tmp_path))
  path = tmp_path / hub.SAFETENSORS_FILE
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file \(Error while deserializing header: "
                                       r"incomplete metadata, file not fully covered\): it is truncated or damaged"):
    hub.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------- resume keeps the math (issue 25)


def test_fields_that_change_the_math_are_listed_and_the_others_are_free():
  saved = tiny_config("c", "dpo").to_dict()
  changed = tiny_config("c", "dpo", **{"dpo.loss_type": "ipo", "optimizer.lr": 5e-3, "lora.enabled": True,
                                       "training.max_steps": 9, "training.log_every": 3, "data.eval_pairs": 4,
                                       "checkpoint.every_steps": 5, "logging.tensorboard": True})
  assert config_lib.changed_fields(changed, saved) == ["dpo.loss_type: 'sigmoid' -> 'ipo'", "lora.enabled: False -> True",
                                                      "optimizer.lr: 0.001 -> 0.005"]
  changed.resume_allow_changes = "optimizer.lr, lora"
  assert config_lib.changed_fields(changed, saved) == ["dpo.loss_type: 'sigmoid' -> 'ipo'"]
  with pytest.raises(config_lib.ConfigError, match=r"the config differs from the one checkpoint step 14 in /w was made "
                                                   r"with, in fields that change the math of training: dpo.loss_type: "
                                                   r"'sigmoid' -> 'ipo'\. .* --config.resume_allow_changes=dpo.loss_type"):
    config_lib.check_unchanged(changed, saved, "checkpoint step 14 in /w")


def test_a_resumed_or_finished_stage_refuses_a_config_that_changes_the_math(cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.run(tiny_config(cache_dir, "sft", **{"training.max_steps": 2}), workdir)
  faster = {"training.max_steps": 2, "optimizer.lr": 5e-3}
  with pytest.raises(config_lib.ConfigError, match=rf"one the finished stage in {workdir} \(done.json\) was made with, "
                                                   r"in fields that change the math of training: optimizer.lr: 0.001 -> "
                                                   r"0.005\."):
    trainer.run(tiny_config(cache_dir, "sft", **faster), workdir)
  os.remove(os.path.join(workdir, trainer.DONE_FILE))  # its checkpoint of step 2 remains: a run to resume
  longer = tiny_config(cache_dir, "sft", **{**faster, "training.max_steps": 4})
  with pytest.raises(config_lib.ConfigError, match=r"one checkpoint step 2 in .*checkpoints was made with, in fields "
                                                   r"that change the math of training: optimizer.lr: 0.001 -> 0.005\."):
    trainer.run(longer, workdir)
  longer.resume_allow_changes = "optimizer.lr"
  trainer.run(longer, workdir)  # allowed; and the step count is free
  assert json.load(open(os.path.join(workdir, trainer.DONE_FILE)))["steps"] == 4


# ------------------------------------------------------------------------- a save that fails never hangs (issue 25)


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(cache_dir, tmp_path):
  # As root permissions do not stop a write, so the folder is made unusable another way: a file where it should be.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  start = time.perf_counter()
  proc = train_cli(config_file(tmp_path, tiny_config(cache_dir, "sft")), str(workdir))
  output, _ = proc.communicate(timeout=60)  # within a minute, whatever happens
  assert proc.returncode not in (0, None), output
  assert re.search(rf"the checkpoint folder {workdir}/checkpoints cannot be written \((FileExistsError|"
                   r"NotADirectoryError): \[Errno \d+\] .*\); make it a writable folder", output), output
  assert time.perf_counter() - start < 60 and not (workdir / "metrics.jsonl").exists()  # before any training


def test_a_save_that_fails_in_the_background_is_reported_at_once_and_the_process_exits(cache_dir, tmp_path):
  config = tiny_config(cache_dir, "sft", **{"training.max_steps": 5000, "checkpoint.async_save": True,
                                             "data.eval_pairs": 0, "training.log_every": 50})
  workdir = tmp_path / "run"
  proc = train_cli(config_file(tmp_path, config), str(workdir))
  folder = workdir / "checkpoints"
  try:
    while not (folder / "2").is_dir():  # a committed step: training and saving are under way
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.05)
    os.rename(folder, tmp_path / "gone")  # the disk went away mid-run: every later save fails
    folder.write_text("not a folder")
    output, _ = proc.communicate(timeout=60)  # on main: never exits (Orbax's threads wait for ever)
  finally:
    proc.kill()
  assert proc.returncode == runguard.SAVE_FAILED_EXIT_CODE, output
  report = re.search(rf"checkpoint step (\d+) could not be saved in {folder} \((\w+Error): [^\n]*\); the last saved "
                     r"step is (\d+)\. Make the folder writable", output)
  assert report, output
  failed, saved = int(report.group(1)), int(report.group(3))
  assert saved >= 2 and failed > saved and failed % 2 == 0
  assert not (workdir / trainer.DONE_FILE).exists()
