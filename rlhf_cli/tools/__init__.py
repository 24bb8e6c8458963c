"""Layer 7: one module per command other than train (sample, eval, merge, plan, ...)."""
