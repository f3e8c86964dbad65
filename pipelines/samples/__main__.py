"""``python -m pipelines.samples --output DIR``: render the sample talking-head videos."""
from pipelines.samples.talking_heads import main

raise SystemExit(main())
