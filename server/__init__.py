"""The Flower ServerApp, strategies, run directory, viewers and the fedsense CLI."""
