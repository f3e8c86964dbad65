"""Foundation: typed configs, paths, weight presets, Ray start-up and the temporal segment rule."""
