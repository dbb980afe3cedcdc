"""Model loading (embedded, GGUF, Hugging Face folders) and structure discovery."""
