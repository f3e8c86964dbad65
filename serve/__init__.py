"""Serving room: the Ray Serve HTTP app for the sampler and its web page."""
