"""Speed and memory benchmarks (`make bench`). Targets live here, never in timed unit tests."""
