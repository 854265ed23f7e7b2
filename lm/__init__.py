"""postlab.lm: the decoder, weight import/export, checkpoints and sharding."""

from lm.config import ModelConfig, RopeScaling, preset
from lm.model import KVCache, Transformer
