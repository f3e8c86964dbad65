"""CLI: generate a talking video from a portrait and an audio file.

    python -m inference.sample --image X --audio Y --out Z.mp4 [--model URI|PATH] [--config FILE]
                            [--device cpu|cuda|auto] [section.key=value ...]

``--model``: an MLflow model URI (``models:/loopy/3``, ``models:/loopy@stage2``, ``runs:/...``)
or a model package folder; default ``serve.model`` of the config. Sampling options are the
package's ``sampler`` section (what the model was trained and evaluated with, as the service
uses), with every ``sampler.*`` key this command is given (``--config`` file or
``sampler.steps=25 sampler.audio_ratio=5 sampler.ref_ratio=3 sampler.seed=0 sampler.fps=25
sampler.size=N``) on top; the model itself is read from the package with the ``platform.yaml`` it
was trained with. Progress is printed per 12-frame clip. Exit status 2 for bad input (the message
names the file), 1 for other failures.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from core.config import ConfigError, add_config_arguments, load_platform_config, parse_overrides, read_yaml
from inference.errors import BadInputError
from inference.portrait import NoFaceError, load_image
from inference.sampler import LoopySampler
from pipelines.errors import PipelineError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m inference.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="portrait image (any size and common format)")
    parser.add_argument("--audio", required=True, help="audio file (any common container / codec / rate)")
    parser.add_argument("--out", required=True, help="output mp4")
    parser.add_argument("--model", default=None, help="MLflow model URI or package folder (default: serve.model)")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default: sampler.device)")
    parser.add_argument("--size", type=int, default=None, help="output side in pixels (default: the model's crop size)")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def given_sampler_keys(config: Optional[str], overrides: Sequence[str]) -> set[str]:
    """The ``sampler`` keys this command was given: those of the ``--config`` file's ``sampler``
    mapping (with its ``base:`` file, read as ``load_config`` reads it) and of the
    ``sampler.KEY=VALUE`` overrides (the rest come from the package)."""
    keys: set[str] = set()
    for given in (read_yaml(config) if config else {}, parse_overrides(overrides)):
        section = given.get("sampler")
        keys |= set(section) if isinstance(section, dict) else set()
    return keys


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: config: {exc}", file=sys.stderr)
        return 2
    model = args.model or cfg.serve.model
    if not model:
        print("error: no model: give --model (MLflow URI or package folder) or serve.model=...", file=sys.stderr)
        return 2
    for flag, path in (("--image", args.image), ("--audio", args.audio)):
        if not Path(path).is_file():
            print(f"error: {flag}: {path}: file not found", file=sys.stderr)
            return 2

    try:
        image = load_image(args.image)
    except BadInputError as exc:
        print(f"error: --image: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    sampler = LoopySampler.from_package(model, device=args.device or cfg.sampler.device,
                                        tracking_uri=cfg.tracking.tracking_uri)
    options = dataclasses.replace(sampler.default_options,
                                  **{k: getattr(cfg.sampler, k) for k in given_sampler_keys(args.config, args.overrides)})
    if args.size is not None:
        options = dataclasses.replace(options, size=args.size)
    print(f"model {model} loaded in {time.perf_counter() - started:.1f} s on {sampler.device}", flush=True)

    def report(p) -> None:
        print(f"clip {p.clips_done}/{p.clips_total}: {p.frames_done}/{p.num_frames} frames, "
              f"{p.elapsed_s:.1f} s", flush=True)

    try:
        result = sampler.generate(image, args.audio, args.out, options, report)
    except NoFaceError as exc:
        print(f"error: --image {args.image}: {exc}", file=sys.stderr)
        return 2
    except (BadInputError, PipelineError) as exc:  # audio: undecodable, too short, too long
        print(f"error: --audio: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps ({result.duration_s:.2f} s) "
          f"in {result.compute_s:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
