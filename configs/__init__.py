"""Hydra configs, shipped as package data so they are found from an editable install and a wheel."""
