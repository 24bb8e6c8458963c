"""Layer 2: rows read from files (rows), examples (examples), batches (batches)."""
