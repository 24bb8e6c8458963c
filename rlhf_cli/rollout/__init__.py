"""Layer 4: rollout batches, engines (hf, vllm) and the sampler."""
