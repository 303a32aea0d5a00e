"""Checkpoints: a sharded nnx.State + optax state + RNG round-trip exactly onto requested shardings; the save schedule
and retention; damaged, missing and half-written checkpoints are skipped for the newest restorable one."""

import dataclasses
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxalign import checkpoint, parallel
from jaxalign.models import opt

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")

TINY = opt.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64)
# Orbax's marker for a step folder still being written (renamed away on commit).
TMP_MARKER = ".orbax-checkpoint-tmp"


@dataclasses.dataclass
class TrainState:
  """Shaped like the trainer's: a registered dataclass around the params and the optimizer state."""

  step: jax.Array
  params: nnx.State
  opt_state: Any
  rng: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state", "rng"], meta_fields=[])


def abstract_of(tree, shardings=None):
  shardings = jax.tree.map(lambda x: x.sharding, tree) if shardings is None else shardings
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def small_state(value: float):
  return {"w": jnp.full((16,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def save_steps(ckpt, steps):
  for step in steps:
    ckpt.save(step, state=small_state(step), extra={"position": step})
  ckpt.wait()


@needs_8
def test_sharded_train_state_round_trips_exactly_onto_requested_shardings(tmp_path):
  mesh = parallel.make_mesh(data=4, fsdp=2)
  # The model's real nnx.State layout, filled from numpy: eager initialisation compiles op by op (seconds).
  _, params, _ = nnx.split(nnx.eval_shape(lambda: opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = parallel.shard_tree(jax.tree.map(lambda a: rng.standard_normal(a.shape, a.dtype), params), mesh,
                               min_size=0)
  tx = optax.adamw(1e-3)
  # One update, so the moments are non-zero and count is 1.
  opt_state = jax.jit(lambda p: tx.update(jax.tree.map(jnp.sin, p), tx.init(p), p)[1])(params)
  state = TrainState(jnp.asarray(7, jnp.int32), params, opt_state, jax.random.key_data(jax.random.key(3)))
  extra = {"data": {"epoch": 1, "position": 40}, "config": {"lr": 1e-3, "name": "sft"}, "metrics": {"loss": 0.5}}
  expected = jax.tree.map(np.asarray, state)

  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2) as ckpt:
    assert ckpt.save(7, state=state, extra=extra)
    # An async save has copied the arrays off the devices when it returns: the trainer donates them next.
    jax.tree.map(lambda x: x.delete(), state)

  # Resume on a different layout: each array must arrive in the sharding asked for, not the one it was saved from.
  other_mesh = parallel.make_mesh(data=2, fsdp=4)
  wanted = parallel.tree_shardings(expected, other_mesh, min_size=0)
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2) as ckpt:
    step, restored, restored_extra = ckpt.restore_latest(abstract_of(expected, wanted))

  assert step == 7 and restored_extra == extra
  assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want, strict=True), restored, expected)
  assert all(jax.tree.leaves(jax.tree.map(lambda got, s: got.sharding == s, restored, wanted)))
  assert restored.opt_state[0].count.dtype == jnp.int32 and int(restored.opt_state[0].count) == 1
  key = jax.random.wrap_key_data(restored.rng)
  np.testing.assert_array_equal(jax.random.key_data(jax.random.split(key)), jax.random.key_data(
      jax.random.split(jax.random.key(3))))


def test_schedule_retention_and_force(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=3, keep=2) as ckpt:
    saved = [ckpt.save(step, state=small_state(step), extra={"position": step}) for step in range(1, 11)]
    assert [step for step, did in zip(range(1, 11), saved) if did] == [3, 6, 9]
    assert ckpt.save(10, state=small_state(10), extra={}, force=True)
    # The forced save at the end of a run may land on a periodic one: skipped, not an error.
    assert not ckpt.save(10, state=small_state(10), extra={}, force=True)
    ckpt.wait()
    assert ckpt.steps() == [9, 10]
  assert checkpoint.latest_step(tmp_path) == 10

  with checkpoint.Checkpointer(tmp_path, save_every_steps=0, keep=None) as ckpt:
    assert not ckpt.save(12, state=small_state(12), extra={})
    with pytest.raises(TypeError, match="step 13 is not JSON-serialisable"):
      ckpt.save(13, state=small_state(13), extra={"loss": np.float32(1.0)}, force=True)
    step, state, extra = ckpt.restore_latest(abstract_of(small_state(0)))
  assert step == 10 and extra == {} and float(state["w"][0]) == 10.0


def test_no_checkpoint_gives_none(tmp_path):
  assert checkpoint.latest_step(tmp_path / "absent") is None
  with checkpoint.Checkpointer(tmp_path / "empty", save_every_steps=1, keep=1) as ckpt:
    assert ckpt.restore_latest(abstract_of(small_state(0))) is None


def _truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files, f"no array data files under {step_dir}: Orbax's layout changed, update this test"
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(8)


def _remove_extra(step_dir):
  shutil.rmtree(os.path.join(step_dir, "extra"))


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{not json")


@pytest.mark.parametrize("damage", [_truncate_arrays, _remove_extra, _garble_metadata])
def test_damaged_newest_step_falls_back_to_previous(tmp_path, caplog, damage):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    save_steps(ckpt, [1, 2, 3])
  damage(str(tmp_path / "3"))

  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    with caplog.at_level(logging.WARNING, logger="jaxalign.checkpoint"):
      step, state, extra = ckpt.restore_latest(abstract_of(small_state(0)))
    assert (step, extra, float(state["w"][0])) == (2, {"position": 2}, 2.0)
    assert any("step 3" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)
    # The resumed run reaches step 3 again: its save replaces the damaged folder instead of being skipped.
    assert ckpt.save(3, state=small_state(33), extra={"position": 33})
    step, state, _ = ckpt.restore_latest(abstract_of(small_state(0)))
    assert (step, float(state["w"][0])) == (3, 33.0)


def test_unusable_abstract_state_is_reported(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    save_steps(ckpt, [1, 2])
    unsharded = {"w": jax.ShapeDtypeStruct((16,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(ValueError, match=r"needs a sharding.*2 have none, e.g. \['step'\], \['w'\]"):
      ckpt.restore_latest(unsharded)
    # As when the config changed between runs (here a parameter was renamed).
    renamed = abstract_of({"v": jnp.zeros(16), "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(checkpoint.CheckpointRestoreError, match=r"(?s)step 2: .*step 1: .*matches the run"):
      ckpt.restore_latest(renamed)


# Saves step 1, starts the async save of a larger step 2 and kills itself with SIGKILL once Orbax's temporary folder
# appears, i.e. in the middle of writing it.
_KILLED_MID_SAVE = textwrap.dedent("""
  import os, signal, sys, time
  import jax.numpy as jnp
  from jaxalign import checkpoint
  directory = sys.argv[1]
  ckpt = checkpoint.Checkpointer(directory, save_every_steps=1, keep=None)
  ckpt.save(1, state={"w": jnp.full((16,), 1.0), "step": jnp.asarray(1, jnp.int32)}, extra={"position": 1})
  ckpt.wait()
  ckpt.save(2, state={"w": jnp.ones((8192, 2048)), "step": jnp.asarray(2, jnp.int32)}, extra={"position": 2})
  deadline = time.time() + 30
  while not any("%s" in name for name in os.listdir(directory)) and time.time() < deadline:
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)
""" % TMP_MARKER)


def test_kill_during_async_save_keeps_previous_step_restorable(tmp_path):
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert any(TMP_MARKER in name for name in os.listdir(tmp_path)), os.listdir(tmp_path)

  assert checkpoint.latest_step(tmp_path) == 1
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    step, state, extra = ckpt.restore_latest(abstract_of(small_state(0)))
    assert (step, extra, float(state["w"][0])) == (1, {"position": 1}, 1.0)
    # The leftover temporary folder neither shadows nor blocks a new save of the same step.
    assert ckpt.save(2, state=small_state(2), extra={"position": 2})
    ckpt.wait()
    assert ckpt.steps() == [1, 2]
  assert not any(TMP_MARKER in name for name in os.listdir(tmp_path))


# ------------------------------------------------------------------------------------------- integrity (issue 16)


def random_state(step: int):
  """Incompressible values: a flipped bit in the stored bytes changes a value instead of breaking decompression."""
  values = np.random.default_rng(step).standard_normal(4096).astype(np.float32)
  return {"w": jnp.asarray(values), "step": jnp.asarray(step, jnp.int32)}


def _flip_a_bit_in_the_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files, f"no array data files under {step_dir}: Orbax's layout changed, update this test"
  biggest = max(files, key=os.path.getsize)  # the 16 KiB of `w`; the others are small metadata records
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x04]))


def _edit_the_extra_item(step_dir):
  path = os.path.join(step_dir, "extra", "metadata")  # Orbax's JSON item file
  text = open(path).read()
  assert '"position": 2' in text, text
  with open(path, "w") as f:  # same size, still valid JSON: only the checksum can tell
    f.write(text.replace('"position": 2', '"position": 7'))


@pytest.mark.parametrize("damage", [_flip_a_bit_in_the_arrays, _edit_the_extra_item])
def test_silently_damaged_newest_step_is_detected_and_the_previous_one_restored(tmp_path, caplog, damage):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state=random_state(step), extra={"position": step})
  sizes = {p: os.path.getsize(p) for p in glob.glob(str(tmp_path / "2" / "**"), recursive=True) if os.path.isfile(p)}
  damage(str(tmp_path / "2"))
  assert sizes == {p: os.path.getsize(p) for p in sizes}  # the damage keeps every file's size

  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    with caplog.at_level(logging.WARNING, logger="jaxalign.checkpoint"):
      step, state, extra = ckpt.restore_latest(abstract_of(random_state(0)))
    assert (step, extra) == (1, {"position": 1}) and ckpt.last_verified_step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(random_state(1)["w"]))
  messages = [r.getMessage() for r in caplog.records]
  assert any("step 2" in m and "could not be restored" in m and "changed since it was saved" in m for m in messages)
  assert any("resuming from checkpoint step 1" in m and "newest step 2" in m for m in messages), messages


def test_non_finite_state_is_refused_on_save_and_on_restore(tmp_path, caplog):
  nan_state = {"w": jnp.full((16,), jnp.nan), "step": jnp.asarray(2, jnp.int32)}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    ckpt.save(1, state=small_state(1), extra={"position": 1})
    with pytest.raises(FloatingPointError, match=r"not saving checkpoint step 2.*\['w'\].*verified checkpoint is step 1"):
      ckpt.save(2, state=nan_state, extra={"position": 2})
  # A non-finite step written without checksums (as by an older jaxalign) is refused on restore.
  manager = ocp.CheckpointManager(str(tmp_path))
  manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(nan_state),
                                          extra=ocp.args.JsonSave({"position": 2})), force=True)
  manager.wait_until_finished()
  manager.close()
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    with caplog.at_level(logging.WARNING, logger="jaxalign.checkpoint"):
      step, _, extra = ckpt.restore_latest(abstract_of(small_state(0)))
  assert (step, extra) == (1, {"position": 1})
  assert any("step 2" in r.getMessage() and "non-finite values in 1 array(s): ['w']" in r.getMessage()
             for r in caplog.records), caplog.text


def test_checksums_see_every_bit_and_ignore_the_sharding():
  values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
  reference, nonfinite = checkpoint.state_checksums({"w": jnp.asarray(values)})
  assert nonfinite == []
  for index in ((0, 0), (3, 17), (7, 63)):
    for bit in (0, 13, 31):
      flipped = values.copy()
      flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checkpoint.state_checksums({"w": jnp.asarray(flipped)})[0] != reference, (index, bit)
  if jax.device_count() >= 8:
    mesh = parallel.make_mesh(data=4, fsdp=2)
    sharded = parallel.shard_tree({"w": jnp.asarray(values)}, mesh, min_size=0)
    assert checkpoint.state_checksums(sharded)[0] == reference
  bf16 = {"b": jnp.asarray(values, jnp.bfloat16), "i": jnp.arange(5), "k": jax.random.key(0), "m": jnp.ones(3) > 0}
  checksums, _ = checkpoint.state_checksums(bf16)
  assert set(checksums) == {"['b']", "['i']", "['k']", "['m']"}
  assert checkpoint.state_checksums({"b": jnp.full(4, jnp.nan, jnp.bfloat16), "i": jnp.arange(3)})[1] == ["['b']"]


# --------------------------------------------------------------------------------------- error texts (issue 25)


def dataclass_state(step: int) -> TrainState:
  """A state whose structure Orbax cannot guess without the step's metadata (a registered dataclass, as training's)."""
  return TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.asarray(random_state(step)["w"])}, (), jax.random.key(step))


def test_a_step_without_its_array_index_is_reported_as_missing_not_as_a_structure_mismatch(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state=dataclass_state(step), extra={"position": step})
  os.remove(tmp_path / "2" / "state" / "_METADATA")
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    with caplog.at_level(logging.WARNING, logger="jaxalign.checkpoint"):
      step, _, _ = ckpt.restore_latest(abstract_of(dataclass_state(0)))
  assert step == 1
  assert f"checkpoint step 2 in {tmp_path} could not be restored (CheckpointIntegrityError: {tmp_path}/2/state/" \
         "_METADATA is missing (the index of the state item): the step's files were damaged or partly deleted " \
         "after it was saved)" in caplog.text
  assert "pytree structure" not in caplog.text


def test_when_every_step_is_damaged_the_message_says_so_and_does_not_blame_the_config(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state=random_state(step), extra={"position": step})
  for step in (1, 2):
    _flip_a_bit_in_the_arrays(str(tmp_path / str(step)))
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=None) as ckpt:
    with pytest.raises(checkpoint.CheckpointRestoreError) as error:
      ckpt.restore_latest(abstract_of(random_state(0)))
  assert str(error.value).endswith("Every step failed its integrity check (files damaged or changed since they were "
                                   "saved; the config is not the cause): restore the folder from a copy, or move it "
                                   "away to start afresh.")
  assert "checksum mismatch" in str(error.value) and "config (model, optimizer" not in str(error.value)
