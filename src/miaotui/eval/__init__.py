"""Quality evaluation: perplexity, KL divergence and top-1 agreement against a reference; tasks; embeddings."""
