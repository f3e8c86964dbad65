"""Which model version a worker serves: registry aliases resolved to pinned versions.

``serve.model`` may name a registry alias (``models:/loopy@stage2``). A worker resolves it to the
version the alias points at now and loads that pinned version (``models:/loopy/7``), so every job
records exactly which version made it. Training moves the alias to each new version; the worker
re-resolves the alias every ``serve.model_poll_s`` seconds and, when it moved, loads the new
version beside the old one and swaps between jobs: a new version goes live without a redeploy.
An operator can also change the model (pin a version, name another alias) through the worker
deployment's Serve ``user_config`` (``{"model": ..., "model_poll_s": ...}``): Serve hands it to
the running replicas' ``reconfigure``, again without restarting them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from core.paths import resolve_tracking_uri

ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


@dataclass(frozen=True)
class ModelChoice:
    """``uri``: what to load (a pinned ``models:/name/N``, or the location as given);
    ``version``: the label jobs record (``name/N``, or the location)."""

    uri: str
    version: str


def is_alias(location: str) -> bool:
    return bool(ALIAS_URI.match(location))


def resolve_model(location: str, tracking_uri: Optional[str]) -> ModelChoice:
    """Pin ``location``: an alias URI becomes the version it points at now (asks the registry at
    ``tracking_uri``); anything else (``models:/name/N``, ``runs:/...``, a folder) is kept."""
    match = ALIAS_URI.match(location)
    if match is None:
        plain = re.match(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$", location)
        return ModelChoice(location, f"{plain['name']}/{plain['version']}" if plain else location)
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri) if tracking_uri else None
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(match["name"], match["alias"]).version
    return ModelChoice(f"models:/{match['name']}/{version}", f"{match['name']}/{version}")
