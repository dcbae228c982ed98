"""Integrations with other libraries, each imported on demand (`import tsa_fast.integrations.hf`), so that
tsa_fast imports without them."""
