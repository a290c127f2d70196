"""Other projects' checkpoint formats, in and out (``llava``: LLaVA-1.5 and llava-hf)."""
