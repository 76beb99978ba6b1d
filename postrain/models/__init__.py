"""Model loading, the embedded tiny model, and generation and scoring with a loaded model (generation)."""
