"""Lightning callbacks that compress Vision Transformers."""
