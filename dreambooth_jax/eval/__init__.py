"""DreamBooth's evaluation metrics (DINO, CLIP-I, CLIP-T, PRES; DIV not yet) with our own Flax encoders."""
