"""Synthetic captions: a transformers vision-language model in process, or an OpenAI-compatible server, and the
rules that clean what they write."""
