"""File formats: safetensors, diffusers folders, single files, LoRA files, tokenizers."""
