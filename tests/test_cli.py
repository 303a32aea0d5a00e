"""The command-line programs on bad input: one clear message, exit status 2, no traceback (tracebacks are for bugs);
and no notice about PyTorch (jaxalign's models need none) at the start of every command."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from jaxalign import cli
from jaxalign.data import hh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             JAXALIGN_CACHE=str(tmp_path / "cache"))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_message(result, *expected):
  assert result.returncode == cli.EXIT_INPUT_ERROR, result.stderr
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  for text in expected:
    assert text in errors[0]


def test_a_misspelled_field_names_the_closest_fields(tmp_path):
  result = run(["train.py", "--config=configs/sft.py", f"--workdir={tmp_path / 'run'}",
                "--config.optimizer.learning_rate=1e-5"], tmp_path)
  assert_one_message(result, "no field 'optimizer.learning_rate'", "--config.optimizer.lr")


def test_a_bad_value_and_a_bad_path_are_one_message(tmp_path):
  assert_one_message(run(["train.py", "--config=configs/dpo.py", f"--workdir={tmp_path / 'run'}",
                          "--config.dpo.loss_type=sigmoidd"], tmp_path), "config.dpo.loss_type")
  assert_one_message(run(["evaluate.py", "--config=configs/eval.py", f"--workdir={tmp_path / 'eval'}",
                          f"--config.rated_responses={tmp_path / 'missing'}"], tmp_path), "missing")
  assert_one_message(run(["-m", "jaxalign.chat", str(tmp_path / "no-such-model")], tmp_path), "no-such-model")


def test_a_hub_id_out_of_reach_is_one_message(tmp_path):
  # Offline, the default starting model's tokenizer (a Hub id) cannot be fetched: said in one line, before any data.
  assert_one_message(run(["train.py", "--config=configs/sft.py", f"--workdir={tmp_path / 'run'}"], tmp_path),
                     "facebook/opt-350m")
  with pytest.raises(cli.InputError, match="the Hub dataset 'nobody/nothing'"):
    hh.load_records("nobody/nothing")


def test_closest_field_names_in_a_study():
  config = ml_collections.ConfigDict({"stage_configs": {"sft": common.get_config()}})
  message = cli.unknown_field_message(config, ["--config.stage_configs.sft.training.max_step=3"])
  assert "did you mean --config.stage_configs.sft.training.max_steps" in message
  assert cli.unknown_field_message(config, ["--config.stage_configs.sft.training.max_steps=3"]) is None


def test_no_pytorch_notice_without_pytorch(tmp_path):
  hide_torch = "import sys; sys.modules['torch'] = None; import jaxalign.tokenizer, transformers; print('ok')"
  result = run(["-c", hide_torch], tmp_path)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
  assert "PyTorch was not found" not in result.stderr


@pytest.mark.parametrize("error", [cli.InputError("x"), FileNotFoundError("x")])
def test_input_errors_exit_with_status_2(error):
  with pytest.raises(SystemExit) as exit_info:
    with cli.input_errors():
      raise error
  assert exit_info.value.code == cli.EXIT_INPUT_ERROR
