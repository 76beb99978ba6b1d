"""Thin TRL subclasses: they override documented hook points only."""
