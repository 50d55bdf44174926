"""curate: prepare text-to-image training sets the way Stable Diffusion 3 was prepared, on Ray."""

__version__ = "0.1.0"
