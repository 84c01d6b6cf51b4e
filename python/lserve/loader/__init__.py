"""Weight and config loaders, pure Python (numpy only): safetensors files (safetensors.py),
Hugging Face config.json and weight names (hf.py), dummy weights (dummy.py), and ModelSpec, the
ModelConfig fields the C++ engine is built from (spec.py). Import the submodules directly, e.g.
`from lserve.loader.hf import load_hf_config`.
"""
