"""Model presets assembled from fastattn.nn blocks, each with a dataclass config."""
from fastattn.models.common import StackConfig
from fastattn.models.encoder import Encoder, EncoderConfig
from fastattn.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from fastattn.models.gpt import GPT, GPTConfig, gemma4_like_config
from fastattn.models.vit import ViT, ViTConfig

__all__ = ["StackConfig", "GPT", "GPTConfig", "gemma4_like_config", "Encoder", "EncoderConfig", "EncoderDecoder",
           "EncoderDecoderConfig", "ViT", "ViTConfig"]
