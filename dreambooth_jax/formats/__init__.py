"""Checkpoint file formats for export/import: the SD single file (ldm layout) and LoRA key layouts (kohya, PEFT).

Pure functions on {key: np.ndarray} state dicts with diffusers/transformers key names and torch layouts.
"""
