"""The Flower ClientApp: local training on one site's private data."""
