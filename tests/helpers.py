"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path): tiny configs and models, runs of
train.py in a subprocess, the SIGKILL-and-resume check, readers of a workdir's metrics and exports."""

import fnmatch
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from configs import common
from jaxalign import hub_push, parallel, reference as reference_lib, sources, stage_model, step, tasks, trainer
from jaxalign.data import pipeline, tokenize
from jaxalign.models import opt
from jaxalign.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = opt.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64, dropout=0.0)


def tiny_config(cache_dir: str, task: str = "sft", /, **fields):
  """A 2-layer OPT on 400 synthetic pairs; `fields` are dotted overrides, e.g. {"dpo.beta": 0.5}."""
  c = common.get_config()
  c.task = task
  c.seed = 0
  c.init_from = ""
  c.tokenizer = "synthetic"
  c.data.source = "synthetic"
  c.data.synthetic_pairs = 400
  c.data.subsets = "harmless-base,helpful-base"
  c.data.cache_dir = cache_dir
  c.data.eval_pairs = 16
  c.data.max_length = 128
  c.data.max_prompt_length = 64
  c.data.buckets = (128,)
  c.model.preset = "opt-125m"
  c.model.arch.update(vocab_size=1024, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                      word_embed_proj_dim=32, max_position_embeddings=160)
  c.model.dropout = 0.0
  c.optimizer.lr = 1e-3
  c.training.batch_size = 8
  c.training.max_steps = 4
  c.training.log_every = 1
  c.training.progress_bar = False
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.logging.tensorboard = False
  for name, value in fields.items():
    parent = c
    *path, leaf = name.split(".")
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return c


def exported(workdir: str) -> dict[str, np.ndarray]:
  return load_file(os.path.join(workdir, trainer.EXPORT_DIR, "model.safetensors"))


def losses_by_step(workdir: str) -> dict[int, float]:
  """The last logged train loss of each step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        out[record["step"]] = record["train/loss"]
  return out


def checkpoint_steps(workdir) -> list[int]:
  """Committed checkpoint steps (Orbax's unfinished `<step>.orbax-checkpoint-tmp-*` folders are not digits)."""
  folder = os.path.join(workdir, "checkpoints")
  return [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []


def config_file(tmp_path, config) -> str:
  """A config file for `train.py` that returns exactly `config`."""
  path = tmp_path / "config.py"
  path.write_text("import ml_collections\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  return str(path)


def train_cli(config_path: str, workdir: str, env_extra: dict | None = None, devices: int = 1):
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  env = dict(os.environ, XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
             PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
  return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), f"--config={config_path}",
                           f"--workdir={workdir}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def assert_same_params(a: dict, b: dict, atol: float = 0.0):
  assert a.keys() == b.keys()
  for name in a:
    if atol:
      np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)
    else:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def run_straight(config, folder, steps: int = 150):
  """(config file, workdir) of a run by train.py straight through `steps` steps (asynchronous checkpoints every 10
  steps), which interrupted and resumed runs of the same config must equal."""
  config.training.max_steps, config.checkpoint.every_steps = steps, 10
  config.checkpoint.async_save, config.data.eval_pairs = True, 0
  path = config_file(folder, config)
  straight = train_cli(path, str(folder / "straight"))
  assert straight.wait(timeout=600) == 0, straight.stdout.read()
  return path, folder / "straight"


def assert_killed_and_resumed_run_equals(path, straight_dir, tmp_path):
  """A run SIGKILLed mid-training and resumed logs the same losses and exports the same parameters, bit for bit, as
  the run straight through."""
  killed_dir = tmp_path / "killed"
  victim = train_cli(path, str(killed_dir))
  deadline = time.time() + 600
  # SIGKILL once a checkpoint exists past the first one, while training is still running.
  while max(checkpoint_steps(killed_dir), default=0) < 20:
    assert time.time() < deadline and victim.poll() is None, "run ended before it could be killed"
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not (killed_dir / trainer.DONE_FILE).exists()
  resumed = train_cli(path, str(killed_dir))
  output = resumed.stdout.read()
  assert resumed.wait(timeout=600) == 0, output
  assert "resumed from step" in output
  assert losses_by_step(str(killed_dir)) == losses_by_step(str(straight_dir))
  assert_same_params(exported(str(killed_dir)), exported(str(straight_dir)))


def assert_kill_and_resume_is_bit_identical(config, tmp_path, steps: int = 150):
  assert_killed_and_resumed_run_equals(*run_straight(config, tmp_path, steps), tmp_path)


def random_pairs(n: int, seed: int = 0) -> tokenize.TokenizedPairs:
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: np.concatenate([rng.integers(3, 64, rng.integers(lo, hi))]).astype(np.int32)
  prompts = [np.concatenate([[2], ids(1, 9)]).astype(np.int32) for _ in range(n)]
  chosen = [np.concatenate([ids(1, 7), [2]]).astype(np.int32) for _ in range(n)]
  rejected = [np.concatenate([ids(1, 7), [2]]).astype(np.int32) for _ in range(n)]
  flags = np.zeros(n, bool)
  return tokenize.TokenizedPairs(prompts, chosen, rejected, flags, flags, flags)


def on_device(batch):
  return jax.tree.map(jnp.asarray, batch)


def prepared(config):
  """(task, model, stage data, reference, mesh, pad id) as `trainer.setup` prepares them."""
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  task = tasks.make_task(config)
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  data = pipeline.load(config, tokenizer, task.batch_kind, mesh)
  model = stage_model.build_model(config, mesh)
  return task, model, data, reference_lib.prepare(task, model, data, config, mesh, tokenizer.pad_token_id), mesh


def step_flops(config) -> float:
  """XLA's FLOP count of the compiled train step of `config`'s first batch."""
  task, model, data, reference, mesh = prepared(config)
  graphdef, params, rest = step.split_model(model, False)
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  source = sources.build(config, data, mesh, tokenizer, reference, graphdef=graphdef, rest=rest, workdir="")
  tx = step.make_optimizer(config.optimizer, 10)
  state = step.TrainState(jax.numpy.zeros((), jax.numpy.int32), params, tx.init(params))
  steps = step.StepFunctions(task, graphdef, rest, tx, jax.random.key(0), accum=1, reference=reference)
  compiled = steps.lower_train(state, source.next(state)).compile()
  analysis = compiled.cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


class FakeHub:
  """Stands in for HfApi: records each repo creation and, at upload time, the files and card that would be sent."""

  def __init__(self):
    self.repos, self.uploads = [], []

  def install(self, monkeypatch):
    hub = self

    def create_repo(api, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
      hub.repos.append({"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok})

    def upload_folder(api, *, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
      ignored = kwargs.get("ignore_patterns") or []  # glob patterns, as huggingface_hub reads them
      files = [f for f in hub_push.folder_files(str(folder_path)) if not any(fnmatch.fnmatch(f, p) for p in ignored)]
      with open(os.path.join(folder_path, "README.md")) as f:
        card = f.read()
      hub.uploads.append({"repo_id": repo_id, "repo_type": repo_type, "files": files, "card": card,
                          "message": commit_message})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def wandb_records(run_dir):
  """The protobuf records of a W&B run file (`run-<id>.wandb`: a ":W&B" header, then LevelDB-log framed records)."""
  from wandb.proto import wandb_internal_pb2  # wandb is optional: the callers skip without it

  (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  block, pos, payload, records = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if length == 0 and kind == 0:
      break
    payload += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a FULL record, or the LAST piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      records.append(record)
      payload = b""
  return records


def tensorboard_events(workdir: str) -> list:
  """The events of a run's TensorBoard files (`<workdir>/tensorboard/events.*`: TFRecord framed, each record a
  length, its CRC, an Event proto and its CRC)."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events
