"""Launching a recipe on many processes and machines (accelerate launch), and the memory it will need."""
