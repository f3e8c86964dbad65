"""Shared foundation: typed configs, weight presets, Ray start-up."""
