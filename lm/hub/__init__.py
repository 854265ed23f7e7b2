"""postlab.lm.hub: every way a model or tokenizer comes in from disk or the hub, through one loader.

`names` (offline aliases, hub ids, their offline fallbacks -> a local directory or `.gguf`);
`weights` (HF directories and GGUF files <-> `lm.model.Transformer`); `tokenizer` (a GGUF's own
tokenizer without torch); `vocab` (character, GPT-2 BPE and byte vocabularies); `runs` (a
`pretrain` run directory back as a model); `chat` (chat-template encoding, end-of-turn ids);
`loader` (`load`, the one entry point, and `load_pretrained` / `load_model` / `load_tokenizer`).
Below it: the model (`lm.*`) and the training infrastructure (`lm.train`, for checkpoints).
"""

from lm.hub.chat import encode_chat, encode_pairs, stop_ids
from lm.hub.loader import load, load_model, load_pretrained, load_tokenizer
from lm.hub.names import (HUB_FALLBACKS, OFFLINE_ALIASES, SMOLLM2_GGUF, ModelNotFoundError, resolve,
                          resolve_alias)
