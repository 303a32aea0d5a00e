"""Our Flax DeBERTa computes the same function as transformers' DebertaV2ForSequenceClassification (random weights,
fp32), and DebertaJudge scores text pairs as the PyTorch model does, in the caller's order."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import judges
from jaxalign.models import deberta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta  # noqa: E402

VOCAB = 64
# v3 is the judge's architecture; the others cover the paths v3 leaves unused.
TINY_CONFIGS = {
    # deberta-v3: relative only, shared key projections, normalised log-bucketed table (here 8 buckets over 32).
    "v3": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=32,
               norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0),
    # No buckets: distances clipped at ±6, so rows of 13 tokens reach the clip.
    "v3_unbucketed": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=-1,
                          max_relative_positions=6, norm_rel_ebd="layer_norm", share_att_key=True,
                          position_biased_input=False, type_vocab_size=0),
    # deberta-v2 style: separate position projections, absolute positions, token types, the convolution, a
    # "p2c|c2p" string, an embedding projection, tanh-GELU.
    "v2": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8, max_relative_positions=24,
               norm_rel_ebd="layer_norm", share_att_key=False, position_biased_input=True, type_vocab_size=2,
               conv_kernel_size=3, conv_act="gelu", embedding_size=24, hidden_act="gelu_new"),
    # c2p only (scale over sqrt(2d)), unnormalised table, no buckets.
    "c2p_only": dict(relative_attention=True, pos_att_type=["c2p"], share_att_key=False, norm_rel_ebd="none",
                     position_biased_input=True, type_vocab_size=2, max_relative_positions=8),
}


def make_torch_deberta(arch: dict, seed: int = 0):
  """A transformers DeBERTa-v2 classifier with one output and random weights, perturbed off their init values, with
  the classifier scaled up so that scores of different texts are far apart (O(1), like the real judge's)."""
  torch.manual_seed(seed)
  config = transformers.DebertaV2Config(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
      max_position_embeddings=32, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **arch)
  model = transformers.DebertaV2ForSequenceClassification(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
    model.classifier.weight.mul_(100.0)
  return model


def padded_batch(kind: str):
  """Right-padded ids, mask and token types for lengths 13, 9, 4, 13; "pair" rows switch to type 1 midway."""
  rng = np.random.default_rng(0)
  lengths = [13, 9, 4, 13]
  ids = np.zeros((4, 13), np.int64)
  mask = np.zeros((4, 13), np.int64)
  types = np.zeros((4, 13), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(4, VOCAB, n)
    mask[row, :n] = 1
    if kind == "pair":
      types[row, n // 2:n] = 1
  return ids, mask, types


# Compiled as a whole (far faster on CPU than the tiny model op by op), once per model and shape.
_jit_call = nnx.jit(lambda model, *args: model(*args))


def flax_logits(model, ids, mask, types) -> np.ndarray:
  # True fp32 matmuls (GPUs default to TF32), like PyTorch's, so that 1e-4 holds on any backend.
  with jax.default_matmul_precision("highest"):
    return np.asarray(_jit_call(model, *map(jnp.asarray, (ids, mask, types))))


def torch_logits(model, ids, mask, types):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def models(request, tmp_path_factory):
  """(torch model, our model loaded from its save_pretrained folder) per tiny config."""
  torch_model = make_torch_deberta(TINY_CONFIGS[request.param])
  folder = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(folder)
  return torch_model, deberta.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_logits_match_transformers(models, kind):
  torch_model, model = models
  ids, mask, types = padded_batch(kind)
  expected = torch_logits(torch_model, ids, mask, types)
  got = flax_logits(model, ids, mask, types)
  assert got.dtype == np.float32 and got.shape == (4, 1)
  diff = np.abs(got - expected).max()
  assert diff <= 1e-4, f"max abs logit diff {diff}"


def test_bfloat16_compute_keeps_fp32_params_and_logits(tmp_path):
  torch_model = make_torch_deberta(TINY_CONFIGS["v3"], seed=1)
  torch_model.save_pretrained(tmp_path)
  model = deberta.from_pretrained(str(tmp_path), dtype="bfloat16")
  assert model.pooler.kernel[...].dtype == jnp.float32
  ids, mask, types = padded_batch("pair")
  got = flax_logits(model, ids, mask, types)
  assert got.dtype == np.float32
  # bf16 keeps about 3 significant digits through 2 blocks; the scores here are O(1-5).
  np.testing.assert_allclose(got, torch_logits(torch_model, ids, mask, types), atol=0.2)


@pytest.mark.parametrize("buckets, max_position", [(256, 512), (8, 32), (8, 24)])
def test_log_buckets_match_transformers(buckets, max_position):
  distances = np.arange(-2 * max_position, 2 * max_position + 1)
  expected = hf_deberta.make_log_bucket_position(torch.tensor(distances), buckets, max_position).long().numpy()
  np.testing.assert_array_equal(deberta.log_bucket_positions(distances, buckets, max_position), expected)


def test_config_reads_transformers_defaults():
  hf = transformers.DebertaV2Config(num_labels=1, pos_att_type="p2c|c2p").to_dict()
  config = deberta.DebertaConfig.from_hf_dict(hf)
  assert config.num_labels == 1 and config.pos_att_type == ("p2c", "c2p")
  assert config.rel_span == 512 and not config.share_att_key and config.conv_kernel_size == 0
  with pytest.raises(ValueError, match="model_type"):
    deberta.DebertaConfig.from_hf_dict({"model_type": "deberta"})
  with pytest.raises(ValueError, match="pos_att_type"):
    deberta.DebertaConfig(pos_att_type=("p2p",))


# ----------------------------------------------------------------------------------------------------------- judge

WORDS = ("how do i bake bread at home mix flour water salt and yeast then what is the capital of france paris "
         "can you help me with my homework sure which subject tell a joke why did chicken cross road").split()


MAX_LENGTH = 24  # the tiny tokenizer's model_max_length (the real judge's is 512 or unset)


def save_tiny_tokenizer(folder):
  """A word-level tokenizer with DeBERTa's special tokens and pair template ("[CLS] A [SEP] B [SEP]", types 0/1)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
  vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
  assert len(vocab) <= VOCAB
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
      model_max_length=MAX_LENGTH, model_input_names=["input_ids", "token_type_ids", "attention_mask"])
  tokenizer.save_pretrained(folder)
  return tokenizer


PAIRS = [
    ("how do i bake bread at home", "mix flour water salt and yeast then bake"),
    ("what is the capital of france", "paris"),
    ("tell me a joke", "why did the chicken cross the road"),
    ("can you help me with my homework", "sure which subject"),
    ("hi", "unknown words here"),
    # Longer than MAX_LENGTH together: truncated longest-first.
    ("how do i bake bread at home " * 3, "mix flour water salt and yeast then bake " * 2),
    ("what", "paris paris"),
]


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("judge")
  # The judge's architecture, plus token types (v3 has none) so that the judge's token_type_ids are checked too.
  torch_model = make_torch_deberta({**TINY_CONFIGS["v3"], "type_vocab_size": 2}, seed=2)
  torch_model.save_pretrained(folder)
  return folder, torch_model, save_tiny_tokenizer(folder)


def test_judge_scores_match_transformers_in_caller_order(judge_folder):
  """The paper's scoring, one pair at a time in PyTorch: `tokenizer(prompt, response, truncation=True)`, which
  truncates to the tokenizer's model_max_length, as the judge's default max_length=None does."""
  folder, torch_model, tokenizer = judge_folder
  judge = judges.DebertaJudge.from_pretrained(str(folder), batch_size=3, buckets=(12,))
  prompts, responses = zip(*PAIRS)
  got = judge.score(prompts, responses)
  expected = []
  for prompt, response in PAIRS:
    with torch.no_grad():
      enc = tokenizer(prompt, response, truncation=True, return_tensors="pt")
      expected.append(torch_model(**enc).logits[0, 0].item())
  lengths = [len(tokenizer(p, r, truncation=True)["input_ids"]) for p, r in PAIRS]
  assert max(lengths) == MAX_LENGTH and min(lengths) <= 12  # both buckets used, one row truncated
  assert list(np.argsort(lengths)) != list(range(len(PAIRS)))  # sorting by length does permute the rows
  assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
  assert np.diff(np.sort(expected)).min() > 1e-3  # scores 10x the tolerance apart: a misplaced row would show
  diff = np.abs(got - np.array(expected)).max()
  assert diff <= 1e-4, f"max abs score diff {diff}"
  assert judge.score([], []).shape == (0,)


def test_judge_without_length_limit_scores_whole_pairs(judge_folder):
  """With max_length=None and a tokenizer that declares no limit (as the paper's `truncation=True` call then does),
  pairs are scored untruncated; rows past the last bucket are padded to a multiple of it."""
  folder, torch_model, tokenizer = judge_folder
  unlimited = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=None)
  judge = judges.DebertaJudge(deberta.from_pretrained(str(folder)), unlimited, batch_size=4, buckets=(16,))
  prompts, responses = zip(*PAIRS)
  got = judge.score(prompts, responses)
  expected = []
  for prompt, response in PAIRS:
    with torch.no_grad():
      expected.append(torch_model(**tokenizer(prompt, response, return_tensors="pt")).logits[0, 0].item())
  assert max(len(tokenizer(p, r)["input_ids"]) for p, r in PAIRS) > 32  # past MAX_LENGTH; padded to 48
  diff = np.abs(got - np.array(expected)).max()
  assert diff <= 1e-4, f"max abs score diff {diff}"


def test_load_judge_dispatches_on_model_type(judge_folder, tmp_path):
  folder, _, _ = judge_folder
  assert isinstance(judges.load_judge(str(folder), batch_size=2, max_length=16), judges.DebertaJudge)
  # A registered family ("opt", "gpt2") goes to the reward-model judge, which then finds no weights in this
  # config-only folder; a model type with no judge is refused.
  for model_type, error in (("opt", FileNotFoundError), ("gpt2", FileNotFoundError), ("t5", ValueError)):
    (tmp_path / model_type).mkdir()
    (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(error):
      judges.load_judge(str(tmp_path / model_type))
