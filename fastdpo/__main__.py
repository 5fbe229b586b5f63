"""``python -m fastdpo`` (also ``accelerate launch -m fastdpo train ...``)."""

from .cli import main

raise SystemExit(main())
