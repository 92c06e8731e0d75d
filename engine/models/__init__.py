"""Model definitions the engine runs (Llama)."""
