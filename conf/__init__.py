"""The Hydra configuration, shipped inside the package (loaded from this folder)."""
