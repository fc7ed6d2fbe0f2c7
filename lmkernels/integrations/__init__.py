"""Patches for other libraries' models (needs the library: `pip install lmkernels[hf]`)."""
