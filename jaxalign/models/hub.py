"""Weights in Hugging Face format: read from the Hub or a local folder, map onto NNX modules, write back.

Reading prefers safetensors (single file or sharded with an index). `pytorch_model.bin` is read through torch with
`weights_only=True` (never unpickling arbitrary objects) and only when torch is installed. Each parameter can be
placed straight onto a sharding, device by device, so a large model is never gathered on one device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import parallel
from jaxalign.models import opt

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# Where a tensor goes: our parameter path -> (HF tensor name, layout transform).
ParamMap = dict[tuple, tuple[str, str]]
_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda w: w,
    "transpose": lambda w: w.T,  # torch Linear stores [out, in]; flax kernels are [in, out]
}


def resolve_model_dir(name_or_path: str, *, revision: str | None = None) -> str:
  """A local folder as is, or a Hub repo id downloaded (config, safetensors; torch .bin only if no safetensors)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise ValueError(f"{name_or_path!r} is a file; expected a folder with {CONFIG_FILE} and weights, or a Hub id")
  from huggingface_hub import list_repo_files, snapshot_download

  try:
    files = list_repo_files(name_or_path, revision=revision)
  except Exception as e:  # offline, unknown repo, gated repo: all end here with the cause attached
    raise OSError(f"{name_or_path!r} is not a local folder and could not be listed on the Hugging Face Hub: {e}") from e
  has_safetensors = any(f.endswith(".safetensors") for f in files)
  patterns = ["*.json", "*.txt", "*.model"] + (["*.safetensors"] if has_safetensors else ["*.bin"])
  return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)


def load_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {model_dir!r}: expected a Hugging Face model folder")
  with open(path) as f:
    return json.load(f)


class CheckpointReader:
  """Random access to the tensors of a HF checkpoint folder by name, as numpy arrays (safetensors memory-mapped)."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self._file_of: dict[str, str] = {}
    self._torch_cache: dict[str, dict[str, np.ndarray]] = {}
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (TORCH_INDEX, TORCH_FILE)):
      index_path, single_path = os.path.join(model_dir, index_name), os.path.join(model_dir, single_name)
      if os.path.exists(index_path):
        with open(index_path) as f:
          self._file_of = {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
      elif os.path.exists(single_path):
        self._file_of = {name: single_path for name in self._names_in(single_path)}
      if self._file_of:
        return
    raise FileNotFoundError(
        f"No weights in {model_dir!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX}")

  def _names_in(self, path: str) -> Iterable[str]:
    if path.endswith(".safetensors"):
      from safetensors import safe_open

      with safe_open(path, framework="numpy") as f:
        return list(f.keys())
    return list(self._torch_tensors(path))

  def _torch_tensors(self, path: str) -> dict[str, np.ndarray]:
    if path not in self._torch_cache:
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"{path} is a PyTorch checkpoint; reading it needs torch (pip install torch), "
                          "or convert it to safetensors") from e
      state = torch.load(path, map_location="cpu", weights_only=True)
      self._torch_cache[path] = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                                 for k, v in state.items()}
    return self._torch_cache[path]

  def names(self) -> set[str]:
    return set(self._file_of)

  def get(self, name: str) -> np.ndarray:
    path = self._file_of[name]
    if path.endswith(".safetensors"):
      from safetensors import safe_open

      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)
    return self._torch_tensors(path)[name]


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def load_into(abstract_model: nnx.Module, reader: CheckpointReader, param_map: ParamMap,
              shardings: Any = None, *, ignore: Iterable[str] = ()) -> nnx.Module:
  """Fills an abstract model (from `nnx.eval_shape`) with tensors from `reader` as mapped by `param_map`.

  `shardings`: None (default device), or a State-shaped tree of `jax.sharding.Sharding` from `parallel`; each array
  is then built shard by shard from the memory-mapped file. Names in the checkpoint that nothing maps to and that are
  not in `ignore` are reported, as are missing names and shape mismatches (errors).
  """
  graphdef, abstract_state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(abstract_state))
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  available = reader.names()
  missing = sorted({hf for path, (hf, _) in param_map.items() if path in flat and hf not in available})
  if missing:
    raise KeyError(f"Checkpoint {reader.model_dir!r} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
  unmapped = sorted(set(flat) - set(param_map))
  if unmapped:
    raise KeyError(f"No checkpoint tensor is mapped to parameters {[_path_str(p) for p in unmapped[:5]]}")
  unused = sorted(available - {hf for hf, _ in param_map.values()} - set(ignore))
  if unused:
    log.warning("Ignoring %d checkpoint tensors not used by the model, e.g. %s", len(unused), unused[:5])

  for path, variable in flat.items():
    hf_name, transform = param_map[path]
    array = _TRANSFORMS[transform](reader.get(hf_name))
    if array.shape != variable.shape:
      raise ValueError(f"Tensor {hf_name!r} in {reader.model_dir!r} has shape {array.shape} after {transform}; "
                       f"parameter {_path_str(path)} expects {variable.shape}")
    array = array.astype(variable.dtype)
    sharding = flat_shardings.get(path)
    if sharding is None:
      value = jax.numpy.asarray(array)
    else:
      sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
      value = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    variable.set_value(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model.safetensors`, or numbered shards plus `model.safetensors.index.json` past `max_shard_bytes`."""
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(array)
    size += array.nbytes
  metadata = {"format": "pt"}  # transformers requires this tag to load safetensors
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SAFETENSORS_FILE), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file_name), metadata=metadata)
    weight_map.update(dict.fromkeys(shard, file_name))
  with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}, f,
              indent=2)


def export_tensors(model: nnx.Module, param_map: ParamMap) -> dict[str, np.ndarray]:
  """Our parameters under their HF names and layouts (inverse of `load_into`), gathered on this host."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return {hf: _TRANSFORMS[transform](parallel.host_numpy(flat[path].get_value()))
          for path, (hf, transform) in param_map.items()}


# ----------------------------------------------------------------------------------------------------------- OPT


def opt_param_map(config: opt.OPTConfig, prefix: str = "model.") -> ParamMap:
  """Our OPT parameter paths -> transformers' OPTForCausalLM tensor names (the LM head is tied, so not listed)."""
  d = f"{prefix}decoder."
  mapping: ParamMap = {
      ("embed_tokens", "embedding"): (f"{d}embed_tokens.weight", "copy"),
      ("embed_positions", "embedding"): (f"{d}embed_positions.weight", "copy"),
  }
  if config.word_embed_proj_dim != config.hidden_size:
    mapping[("project_in", "kernel")] = (f"{d}project_in.weight", "transpose")
    mapping[("project_out", "kernel")] = (f"{d}project_out.weight", "transpose")
  if config.do_layer_norm_before:
    mapping[("final_layer_norm", "scale")] = (f"{d}final_layer_norm.weight", "copy")
    mapping[("final_layer_norm", "bias")] = (f"{d}final_layer_norm.bias", "copy")
  linears = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "out_proj"),
             ("fc1",), ("fc2",)]
  norms = [("self_attn_layer_norm",), ("final_layer_norm",)]
  for i in range(config.num_hidden_layers):
    for module in linears:
      hf = f"{d}layers.{i}.{'.'.join(module)}"
      mapping[("layers", i, *module, "kernel")] = (f"{hf}.weight", "transpose")
      if config.enable_bias:
        mapping[("layers", i, *module, "bias")] = (f"{hf}.bias", "copy")
    if config.layer_norm_elementwise_affine:
      for module in norms:
        hf = f"{d}layers.{i}.{module[0]}"
        mapping[("layers", i, *module, "scale")] = (f"{hf}.weight", "copy")
        mapping[("layers", i, *module, "bias")] = (f"{hf}.bias", "copy")
  return mapping


def opt_prefix(reader: CheckpointReader) -> str:
  # Current transformers checkpoints say "model.decoder.*"; facebook's original OPT uploads say "decoder.*".
  for prefix in ("model.", ""):
    if f"{prefix}decoder.embed_tokens.weight" in reader.names():
      return prefix
  raise KeyError(f"{reader.model_dir!r} does not look like an OPT checkpoint: no decoder.embed_tokens.weight")


def abstract_opt(config: opt.OPTConfig) -> opt.OPTForCausalLM:
  """An OPT with shapes and dtypes but no memory behind its parameters (fill it with `load_into`)."""
  return nnx.eval_shape(lambda: opt.OPTForCausalLM(config, rngs=nnx.Rngs(0)))


def from_pretrained(name_or_path: str, *, revision: str | None = None, shardings: Any = None,
                    shardings_fn: Callable[[nnx.Module], Any] | None = None, **compute) -> opt.OPTForCausalLM:
  """Loads an OPT from a Hub id (e.g. "facebook/opt-350m") or a local HF folder.

  `compute` sets how to compute (dtype, remat, attention_impl). `shardings` (a State-shaped tree) or
  `shardings_fn(abstract_model)` places each parameter directly onto its sharding.
  """
  model_dir = resolve_model_dir(name_or_path, revision=revision)
  config = opt.OPTConfig.from_hf_dict(load_config(model_dir), **compute)
  reader = CheckpointReader(model_dir)
  abstract = abstract_opt(config)
  if shardings is None and shardings_fn is not None:
    shardings = shardings_fn(abstract)
  prefix = opt_prefix(reader)
  return load_into(abstract, reader, opt_param_map(config, prefix), shardings, ignore=["lm_head.weight"])


def save_pretrained(model: opt.OPTForCausalLM, out_dir: str, *, dtype: str | None = None) -> None:
  """Writes `config.json` + safetensors that transformers' `OPTForCausalLM.from_pretrained(out_dir)` loads.

  `dtype` (e.g. "bfloat16") converts the stored weights; default keeps the parameter dtype. In a multi-host run every
  process must call this (arrays are gathered); only process 0 writes.
  """
  tensors = export_tensors(model, opt_param_map(model.config))
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  hf_config = model.config.to_hf_dict()
  hf_config["dtype"] = str(next(iter(tensors.values())).dtype)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  write_safetensors(tensors, out_dir)
