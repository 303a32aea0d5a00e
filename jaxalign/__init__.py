"""jaxalign: align language models (SFT, DPO and TRL's preference methods, reward models) in JAX/Flax."""

import logging


def _without_torch_notice(record: logging.LogRecord) -> bool:
  """transformers says on import that PyTorch was not found; jaxalign needs no PyTorch (its models are Flax), so the
  notice would only open every command of the default install. Every other transformers message stays."""
  return "PyTorch was not found" not in record.getMessage()


# transformers logs the notice on its library logger while it is first imported; a filter set before then drops it.
logging.getLogger("transformers").addFilter(_without_torch_notice)
