"""Integrations with third-party libraries. Each submodule imports its library lazily (on `register()`), so
`import fusedkernels` never needs them.

- `fusedkernels.integrations.transformers`: `attn_implementation="fusedkernels"` for Hugging Face models.
"""
