"""kvlib: multi-teacher KV-cache distillation across models that differ in tokenizer, depth,
head size and number of KV heads.

Inside kvlib a per-layer KV tensor is always ``(B, H, T, D)``: batch, KV heads, time, head dim;
suffixes ``t`` / ``s`` mean teacher / student. Only :mod:`kvlib.hf` touches Hugging Face caches.
"""

__version__ = "0.1.0"
