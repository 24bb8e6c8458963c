"""Layer 0: errors, console and progress, distributed helpers, quiet libraries, files."""
