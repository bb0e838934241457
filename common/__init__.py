"""Shared MRI physics, masks, data-consistency layers, models, metrics and site data (no Flower)."""
