"""The learned energy model: context tokens, layers, the model and its files."""
