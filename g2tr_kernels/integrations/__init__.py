"""Drop-in adapters: Hugging Face VLMs (hf) and other token-pruning codebases (pruning).

Imported lazily by their users: hf needs transformers, pruning needs nothing extra.
"""
