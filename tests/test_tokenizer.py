from jaxalign.tokenizer import OPT_EOS_ID, OPT_PAD_ID


def test_tiny_tokenizer_has_opt_semantics(tiny_tokenizer):
  ids = tiny_tokenizer("Hello world").input_ids
  assert ids[0] == OPT_EOS_ID  # OPT starts every text with </s>
  assert tiny_tokenizer.pad_token_id == OPT_PAD_ID
  assert tiny_tokenizer.eos_token_id == OPT_EOS_ID
  assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"
