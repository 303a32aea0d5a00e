"""Data formats: detection per file, TRL's standard preference format (strings and messages, explicit and implicit
prompts), `messages` for SFT, HH converted to messages, Parquet, and every record counted."""

import pytest

from chat_data import BAD_COUNTS, BAD_RECORDS, conversational_records, write_jsonl
from jaxalign.data import formats, hh

USER, ASSISTANT = "user", "assistant"


def msg(role, content):
  return {"role": role, "content": content}


HH_RECORD = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bake bread?\n\nAssistant: Mix flour.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bake bread?\n\nAssistant: No."}


@pytest.mark.parametrize("record, expected", [
    (HH_RECORD, "hh"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, "preference"),
    ({"prompt": [msg(USER, "Hi")], "chosen": [msg(ASSISTANT, "Hello")], "rejected": [msg(ASSISTANT, "No")]},
     "conversational"),
    ({"chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")], "rejected": [msg(USER, "Hi"), msg(ASSISTANT, "No")]},
     "conversational"),
    ({"messages": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")]}, "messages"),
])
def test_format_is_detected_from_fields_and_types(record, expected):
  assert formats.record_format(record) == expected
  assert formats.detect_formats([record], "f.jsonl") == {expected: 1}


def test_ambiguous_or_unknown_fields_name_the_file():
  with pytest.raises(ValueError, match=r"f\.jsonl: record 0 has both 'messages' and 'chosen'"):
    formats.detect_formats([{"messages": [], "chosen": []}], "f.jsonl")
  with pytest.raises(ValueError, match=r"f\.jsonl: records have fields \['answer', 'question'\]"):
    formats.detect_formats([{"question": "q", "answer": "a"}], "f.jsonl")
  sft = {"messages": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")]}
  with pytest.raises(ValueError, match=r"f\.jsonl: mixes 2 SFT conversations \('messages' records, e.g. record 1\) "
                                       r"with 1 preference pairs \('chosen'/'rejected' records, e.g. record 0\)"):
    formats.detect_formats([HH_RECORD, sft, sft], "f.jsonl")


def test_hh_text_becomes_messages_with_the_shared_turns_as_prompt():
  prompt, chosen, rejected = formats.split_hh_as_messages(HH_RECORD)
  assert prompt == (msg(USER, "Hi"), msg(ASSISTANT, "Hello!"), msg(USER, "Bake bread?"))
  assert chosen == (msg(ASSISTANT, "Mix flour."),) and rejected == (msg(ASSISTANT, "No."),)
  # The paper's prompt form (no leading blank line, no final cue) parses the same way.
  assert formats.hh_messages("Human: Hi\n\nAssistant: Hello!\n\nHuman: Bake bread?") == prompt
  assert formats.hh_messages("\n\nHuman: Bake bread?\n\nAssistant:", prompt=True) == (msg(USER, "Bake bread?"),)
  # A record whose final answer is empty is counted as such (as for HH text).
  empty = {"chosen": HH_RECORD["chosen"], "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bake bread?"
           "\n\nAssistant:"}
  _, report = formats.conversations_from_records([HH_RECORD, empty], "f", "hh")
  assert dict(report.skipped) == {hh.EMPTY_RESPONSE: 1}


def test_implicit_prompt_is_the_common_leading_messages_and_counts_multi_turn_responses():
  early = {"chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello"), msg(USER, "Bye"), msg(ASSISTANT, "Bye!")],
           "rejected": [msg(USER, "Hi"), msg(ASSISTANT, "Go away")]}
  user_diverges = {"chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello"), msg(USER, "A")],
                   "rejected": [msg(USER, "Hi"), msg(ASSISTANT, "Hello"), msg(USER, "B")]}
  conversations, report = formats.conversations_from_records([early, user_diverges], "f", "conversational")
  (only,) = conversations
  assert only.prompt == (msg(USER, "Hi"),) and len(only.chosen) == 3 and only.rejected == (msg(ASSISTANT, "Go away"),)
  assert report.fallback == 1 and dict(report.skipped) == {formats.NO_RESPONSE: 1} and report.examples[
      formats.NO_RESPONSE] == ["f#1"]


def test_explicit_prompts_strings_and_prompt_strings_repeated_in_whole_conversations():
  explicit = {"prompt": "Hi", "chosen": [msg(ASSISTANT, "Hello")], "rejected": [msg(ASSISTANT, "No")]}
  # UltraFeedback-binarized: a prompt string and whole conversations that start with it.
  ultrafeedback = {"prompt": "Hi", "chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")],
                   "rejected": [msg(USER, "Hi"), msg(ASSISTANT, "No")]}
  strings = {"prompt": "Hi", "chosen": "Hello", "rejected": "No"}
  expected = ((msg(USER, "Hi"),), (msg(ASSISTANT, "Hello"),), (msg(ASSISTANT, "No"),))
  assert formats.split_conversational(explicit) == expected
  assert formats.split_conversational(ultrafeedback) == expected
  assert formats.split_preference_as_messages(strings) == expected


def test_messages_keep_their_other_keys_but_not_the_empty_ones():
  call = {"role": ASSISTANT, "content": "", "tool_calls": [{"name": "weather"}]}
  record = {"messages": [{"role": USER, "content": "Weather?", "tool_calls": None}, call,
                         {"role": "tool", "content": "sunny"}, msg(ASSISTANT, "Sunny.")]}
  prompt, response, _ = formats.split_messages(record)
  assert prompt == (msg(USER, "Weather?"), call, {"role": "tool", "content": "sunny"})
  assert response == (msg(ASSISTANT, "Sunny."),)


def test_messages_records_split_at_their_last_assistant_turn():
  record = {"messages": [msg("system", "Be kind."), msg(USER, "Hi"), msg(ASSISTANT, "Hello"), msg(USER, "Joke?"),
                         msg(ASSISTANT, "No.")]}
  prompt, response, rejected = formats.split_messages(record)
  assert len(prompt) == 4 and response == (msg(ASSISTANT, "No."),) and rejected is None
  conversations, report = formats.conversations_from_records(
      [record, {"messages": [msg(USER, "Hi")]}, {"messages": [{"role": "robot", "content": "beep"}]}], "f", "messages")
  assert len(conversations) == 1 and not conversations[0].is_pair
  assert dict(report.skipped) == {formats.NO_RESPONSE: 1, formats.NOT_MESSAGES: 1}


def test_every_record_of_a_file_is_counted(tmp_path):
  path = write_jsonl(str(tmp_path / "train.jsonl"), conversational_records(12) + BAD_RECORDS)
  conversations, report = formats.load_examples(path, chat=True)
  assert len(conversations) == report.used == 12 and report.total == 16
  assert dict(report.skipped) == BAD_COUNTS
  assert report.total == report.used + sum(report.skipped.values())
  assert [c.index for c in conversations] == list(range(12))


def test_message_formats_need_a_chat_template_and_text_formats_stay_text(tmp_path):
  path = write_jsonl(str(tmp_path / "train.jsonl"), conversational_records(4))
  with pytest.raises(ValueError, match="train.jsonl: conversational records .* need a chat template"):
    formats.load_examples(path, chat=False)
  hh_path = write_jsonl(str(tmp_path / "hh" / "train.jsonl"), [HH_RECORD])
  (pair,), _ = formats.load_examples(hh_path, chat=False)
  assert isinstance(pair, hh.PreferencePair) and pair.chosen == " Mix flour."
  (conversation,), _ = formats.load_examples(hh_path, chat=True)
  assert conversation.chosen == (msg(ASSISTANT, "Mix flour."),)
  # A format given explicitly is the one used: HH records read as TRL preference records lack their prompt.
  with pytest.raises(ValueError, match=r"no usable preference pair .*missing_field 1"):
    formats.load_examples(hh_path, data_format="preference", chat=False)


def test_parquet_files_load_through_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  records = conversational_records(6)
  path = str(tmp_path / "train.parquet")
  datasets.Dataset.from_list([{"prompt": r.get("prompt") or r["chosen"][:-1], "chosen": r["chosen"][-1:],
                               "rejected": r["rejected"][-1:]} for r in records]).to_parquet(path)
  from_parquet, report = formats.load_examples(str(tmp_path), data_format="conversational", chat=True)
  from_jsonl, _ = formats.load_examples(write_jsonl(str(tmp_path / "j" / "train.jsonl"), records), chat=True)
  assert report.used == 6
  assert [(c.prompt, c.chosen, c.rejected) for c in from_parquet] == [(c.prompt, c.chosen, c.rejected)
                                                                       for c in from_jsonl]


@pytest.mark.parametrize("fields, message", [
    ({"data.format": "csv"}, r"config.data.format = 'csv' is not allowed"),
    ({"data.chat_template": "chatml"}, r"config.data.chat_template = 'chatml' is invalid"),
    ({"data.loss_on": "assistant"}, r"loss on assistant turns needs data.chat_template"),
    ({"data.format": "conversational"}, r"messages need a template"),
    ({"task": "dpo", "data.format": "messages", "data.chat_template": "tokenizer"}, r"'messages' records have no "),
])
def test_config_fields_are_validated(fields, message):
  from configs import common
  from jaxalign import config_lib

  c = common.get_config()
  for name, value in fields.items():
    *path, leaf = name.split(".")
    (c[path[0]] if path else c)[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_study_smollm2_renders_with_the_chat_template_for_training_and_evaluation():
  from configs import study_smollm2

  train = study_smollm2.get_config()
  assert all(train.stage_configs[name].data.chat_template == "tokenizer" for name in train.stages)
  assert train.stage_configs.sft.data.loss_on == "assistant" and train.stage_configs.sft_dpo.init_from == "stage:sft"
  assert train.stage_configs.dpo.init_from == study_smollm2.MODEL
  evaluation = study_smollm2.get_config("eval")
  assert evaluation.generation.chat_template == "tokenizer" and evaluation.models.startswith(
      f"base={study_smollm2.MODEL},")


def test_a_file_mixing_formats_is_read_per_record(tmp_path, caplog):
  """Issue 25: HH records and {prompt, chosen, rejected} records in one file are all used (text and chat)."""
  generic = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go away"}
  path = write_jsonl(str(tmp_path / "train.jsonl"), [HH_RECORD] * 64 + [generic] * 8)
  with caplog.at_level("INFO", logger="jaxalign"):
    pairs, report = formats.load_examples(path, chat=False)
  assert (report.total, report.used, sum(report.skipped.values())) == (72, 72, 0)
  assert pairs[0].chosen == " Mix flour." and pairs[-1].chosen == " Hello"
  assert "train.jsonl (hh 64, preference 8): 72 records: 72 used" in caplog.text
  pairs, report = hh.load_preference_pairs(path)  # the evaluator's and pair scoring's loader
  assert report.used == 72
  conversations, report = formats.load_examples(path, chat=True)
  assert report.used == 72 and conversations[-1].chosen == (msg(ASSISTANT, " Hello"),)


def test_sharegpt_messages_are_read_and_other_messages_say_what_a_message_is(tmp_path, caplog):
  sharegpt = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]}
  (conversation,), _ = formats.conversations_from_records([sharegpt], "f")
  assert conversation.prompt == (msg("system", "Be kind."), msg(USER, "Hi"))
  assert conversation.chosen == (msg(ASSISTANT, "Hello"),)
  bad = {"messages": [{"speaker": "human", "text": "Hi"}]}
  path = write_jsonl(str(tmp_path / "train.jsonl"), [{"messages": sharegpt["conversations"]}, bad])
  with caplog.at_level("WARNING", logger="jaxalign"):
    _, report = formats.load_examples(path, chat=True)
  assert report.skipped == {formats.NOT_MESSAGES: 1}
  assert ("records skipped as not_messages, e.g. " + path + "#1: found the message {'speaker': 'human', 'text': "
          "'Hi'}; a message must be {\"role\": one of ['system', 'user', 'assistant', 'tool'], \"content\": text} "
          "(or ShareGPT's {\"from\": \"human\" / \"gpt\" / \"system\", \"value\": text})") in caplog.text
  with pytest.raises(ValueError, match=r"no usable auto record among its 1 records \(.*; not_messages at f#0: found "
                                       r"str 'hi'; expected a list of messages"):
    formats.conversations_from_records([{"messages": "hi"}], "f")
