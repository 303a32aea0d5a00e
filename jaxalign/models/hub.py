"""Weights in Hugging Face format: read from the Hub or a local folder, map onto NNX modules, write back.

Reading prefers safetensors (single file or sharded with an index). `pytorch_model.bin` is read through torch with
`weights_only=True` (never unpickling arbitrary objects) and only when torch is installed. Each parameter can be
placed straight onto a sharding, device by device, so a large model is never gathered on one device.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import parallel
from jaxalign.errors import MissingInput
from jaxalign.models import registry
from jaxalign.workdirs import CONFIG_FILE

log = logging.getLogger(__name__)

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
    raise MissingInput(f"{name_or_path!r} is not a local folder and could not be listed on the Hugging Face Hub: "
                       f"{_first_line(e)}") from e
  has_safetensors = any(f.endswith(".safetensors") for f in files)
  patterns = ["*.json", "*.txt", "*.model"] + (["*.safetensors"] if has_safetensors else ["*.bin"])
  return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)


def _first_line(error: Exception) -> str:
  """An exception as one line: its type and the first line of its message (the Hub's errors run to many)."""
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def load_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise MissingInput(f"No {CONFIG_FILE} in {model_dir!r}: expected a Hugging Face model folder")
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
    raise MissingInput(
        f"No weights in {model_dir!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX}")

  def _names_in(self, path: str) -> Iterable[str]:
    if path.endswith(".safetensors"):
      with _open_safetensors(path) as f:
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
      with _open_safetensors(path) as f:
        return f.get_tensor(name)
    return self._torch_tensors(path)[name]


def _open_safetensors(path: str):
  """safetensors' reader of `path`; a truncated or damaged file is a ValueError naming it (the library's own error
  names no file)."""
  from safetensors import SafetensorError, safe_open

  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e}): it is truncated or damaged (a download or copy "
                     "cut short?); download or copy it again") from e


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def grow_rows(array: np.ndarray, axis: int, rows: int) -> np.ndarray:
  """`array` with `rows` entries along `axis`, the new ones the mean of the old (as transformers' mean resizing of
  token embeddings: a new token starts as an average token, not as noise)."""
  mean = array.mean(axis=axis, keepdims=True)
  return np.concatenate([array, np.repeat(mean, rows - array.shape[axis], axis=axis)], axis=axis)


_PART = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def tensor_part(name: str) -> tuple[str, slice | None]:
  """The checkpoint tensor and rows of a mapped name: "w[64:96]" is rows 64..95 (output features, before any
  transpose) of the fused tensor "w", as Phi-3's `qkv_proj` holds q, k and v one after another."""
  match = _PART.match(name)
  return (match[1], slice(int(match[2]), int(match[3]))) if match else (name, None)


def read_tensor(reader: CheckpointReader, name: str) -> np.ndarray:
  base, rows = tensor_part(name)
  array = reader.get(base)
  return array if rows is None else array[rows]


def load_into(abstract_model: nnx.Module, reader: CheckpointReader, param_map: ParamMap,
              shardings: Any = None, *, ignore: Iterable[str] = (), vocab_rows: tuple[int, int] | None = None
              ) -> nnx.Module:
  """Fills an abstract model (from `nnx.eval_shape`) with tensors from `reader` as mapped by `param_map`.

  `shardings`: None (default device), or a State-shaped tree of `jax.sharding.Sharding` from `parallel`; each array
  is then built shard by shard from the memory-mapped file. Names in the checkpoint that nothing maps to and that are
  not in `ignore` are reported, as are missing names and shape mismatches (errors). `vocab_rows` (checkpoint rows,
  model rows): the model's token embedding (and untied LM head) has more rows than the checkpoint's, e.g. for an
  added pad token; the new rows start at the mean of the checkpoint's (`grow_rows`).
  """
  graphdef, abstract_state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(abstract_state))
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  available = reader.names()
  used = {path: tensor_part(hf)[0] for path, (hf, _) in param_map.items()}
  missing = sorted({hf for path, hf in used.items() if path in flat and hf not in available})
  if missing:
    raise KeyError(f"Checkpoint {reader.model_dir!r} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
  unmapped = sorted(set(flat) - set(param_map))
  if unmapped:
    raise KeyError(f"No checkpoint tensor is mapped to parameters {[_path_str(p) for p in unmapped[:5]]}")
  unused = sorted(available - set(used.values()) - set(ignore))
  if unused:
    log.warning("Ignoring %d checkpoint tensors not used by the model, e.g. %s", len(unused), unused[:5])

  for path, variable in flat.items():
    hf_name, transform = param_map[path]
    array = _TRANSFORMS[transform](read_tensor(reader, hf_name))
    if vocab_rows and array.shape != variable.shape:
      grown = [axis for axis, (have, want) in enumerate(zip(array.shape, variable.shape)) if have != want]
      if len(grown) == 1 and (array.shape[grown[0]], variable.shape[grown[0]]) == vocab_rows:
        array = grow_rows(array, grown[0], vocab_rows[1])
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
  """Our parameters under their HF names and layouts (inverse of `load_into`), gathered on this host; the parts of a
  fused tensor are concatenated in row order."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  parts: dict[str, list[tuple[int, np.ndarray]]] = {}
  for path, (hf, transform) in param_map.items():
    base, rows = tensor_part(hf)
    array = _TRANSFORMS[transform](parallel.host_numpy(flat[path].get_value()))
    parts.setdefault(base, []).append((rows.start if rows else 0, array))
  return {base: np.concatenate([a for _, a in sorted(pieces, key=lambda piece: piece[0])], axis=0)
          if len(pieces) > 1 else pieces[0][1] for base, pieces in parts.items()}


# ------------------------------------------------------------------------------------------- every family

# Buffers some checkpoints carry that are not parameters: RoPE tables, GPT-2 / GPT-NeoX causal-mask constants.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.(masked_)?bias|\.attention\.(masked_)?bias)$")


def checkpoint_prefix(reader: CheckpointReader, fam: registry.Family, first_param: str) -> str:
  """Which of the family's name prefixes the checkpoint uses (e.g. "model.decoder." or facebook's "decoder.")."""
  names = reader.names()
  for prefix in fam.prefixes:
    if prefix + first_param in names:
      return prefix
  raise KeyError(f"{reader.model_dir!r} does not look like a {fam.model_type} checkpoint: none of "
                 f"{[p + first_param for p in fam.prefixes]} is in it")


def load_model(abstract: nnx.Module, reader: CheckpointReader, fam: registry.Family, shardings: Any = None, *,
               under: tuple = (), extra: ParamMap | None = None, vocab_rows: tuple[int, int] | None = None
               ) -> nnx.Module:
  """Fills `abstract` (a causal LM, or a model holding one at `under`) from a checkpoint of family `fam`; `extra`
  maps parameters outside the decoder (a reward head); `vocab_rows` as in `load_into`. An unused LM head and known
  buffers are ignored."""
  unprefixed = registry.param_map(abstract, fam, "", under=under)
  first_body_name = next(tensor_part(name)[0] for path, (name, _) in unprefixed.items()
                         if path[len(under)] not in fam.head_attributes)
  mapping = registry.param_map(abstract, fam, checkpoint_prefix(reader, fam, first_body_name), under=under)
  mapping.update(extra or {})
  heads = {f"{head}.weight" for head in fam.head_attributes + ("lm_head",)}
  ignore = [name for name in reader.names() if _BUFFERS.search(name) or name in heads]
  return load_into(abstract, reader, mapping, shardings, ignore=ignore, vocab_rows=vocab_rows)


def with_vocab_size(config, vocab_size: int):
  """(config with at least `vocab_size` token rows, (checkpoint rows, model rows) or None when unchanged)."""
  if vocab_size <= config.vocab_size:
    return config, None
  return config.replace(vocab_size=vocab_size), (config.vocab_size, vocab_size)


def from_pretrained(name_or_path: str, *, revision: str | None = None, shardings: Any = None,
                    shardings_fn: Callable[[nnx.Module], Any] | None = None, vocab_size: int = 0,
                    **compute) -> nnx.Module:
  """Loads a causal LM of any registered family from a Hub id (e.g. "facebook/opt-350m",
  "HuggingFaceTB/SmolLM2-360M") or a local folder (single or sharded safetensors; torch .bin through
  `weights_only`).

  `compute` sets how to compute (dtype, remat, attention_impl, dropout). `shardings` (a State-shaped tree) or
  `shardings_fn(abstract_model)` places each parameter directly onto its sharding. `vocab_size`: at least this many
  token rows (a tokenizer's added pad token); new rows start at the mean of the checkpoint's.
  """
  model_dir = resolve_model_dir(name_or_path, revision=revision)
  config, vocab_rows = with_vocab_size(registry.config_from_hf(load_config(model_dir), **compute), vocab_size)
  reader = CheckpointReader(model_dir)
  abstract = registry.abstract_causal_lm(config)
  if shardings is None and shardings_fn is not None:
    shardings = shardings_fn(abstract)
  return load_model(abstract, reader, registry.family_of(config), shardings, vocab_rows=vocab_rows)


def write_model(out_dir: str, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes config.json (with the stored dtype) and the safetensors; only process 0 writes."""
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  hf_config["dtype"] = str(next(iter(tensors.values())).dtype)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  write_safetensors(tensors, out_dir)


def save_pretrained(model: nnx.Module, out_dir: str, *, dtype: str | None = None) -> None:
  """Writes `config.json` + safetensors that transformers' `AutoModelForCausalLM.from_pretrained(out_dir)` loads
  (`OPTForCausalLM`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `GPTNeoXForCausalLM`, `GPT2LMHeadModel`…).

  `dtype` (e.g. "bfloat16") converts the stored weights; default keeps the parameter dtype. In a multi-host run every
  process must call this (arrays are gathered); only process 0 writes.
  """
  tensors = export_tensors(model, registry.param_map(model, registry.family_of(model.config)))
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  write_model(out_dir, model.config.to_hf_dict(), tensors)
