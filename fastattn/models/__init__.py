"""Model presets assembled from fastattn.nn blocks, each with a dataclass config."""
from fastattn.models.common import StackConfig
from fastattn.models.gpt import GPT, GPTConfig

__all__ = ["StackConfig", "GPT", "GPTConfig"]
