"""The encode stage's parts: aspect-ratio buckets, and the SD3 VAE and text encoders loaded and called."""
