"""Model loaders: each loads a real model from its real on-disk format, once per worker."""
