"""Reducers that act inside the language model (FastV, FrameFusion, ZipVL): registered in ``INLLM``."""
