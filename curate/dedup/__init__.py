"""Copy-detection dedup algorithms (numpy + FAISS), used by the dedup stage and the benchmark."""
