"""Builders of small random-weight models of real architectures, for tests and the offline demo."""
