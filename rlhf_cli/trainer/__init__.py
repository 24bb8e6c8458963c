"""Layer 5: the loop, the online stage base, checkpoints, tracking, the model card."""
