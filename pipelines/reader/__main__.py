"""``python -m pipelines.reader DIR --show N``: print the first N training samples of a dataset."""
from pipelines.reader.source import main

raise SystemExit(main())
