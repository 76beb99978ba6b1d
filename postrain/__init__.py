"""postrain: recipe-driven LLM post-training over Hugging Face TRL."""

__version__ = "0.1.0"
