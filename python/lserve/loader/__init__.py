"""Weight loaders: Hugging Face directories (config.json + safetensors) and dummy weights."""
