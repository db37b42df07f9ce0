"""KV cache at decode time: one file per method, each a ``KVMethod`` that makes a transformers ``Cache``."""
