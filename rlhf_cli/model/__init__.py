"""Layer 3: loading (load), kernels, log-prob paths (forward), heads, offline models."""
