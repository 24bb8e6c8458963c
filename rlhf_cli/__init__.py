"""rlhf-cli: fine-tune language models with human feedback from one command line."""

__version__ = "0.1.0"
