"""DreamBooth's evaluation metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) with our own Flax encoders."""
