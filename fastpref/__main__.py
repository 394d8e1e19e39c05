"""``python -m fastpref …`` runs the command line (:mod:`fastpref.cli`)."""

from .cli import main

raise SystemExit(main())
