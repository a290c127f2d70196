"""mm_llama: any-to-text models from modality encoders, learned projectors and a Llama-family LLM."""

__version__ = "0.1.0"
