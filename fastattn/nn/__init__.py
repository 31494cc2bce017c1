"""fastattn.nn: modules built only on fastattn's public functions."""
from fastattn.nn.kv_cache import KVCache

__all__ = ["KVCache"]
