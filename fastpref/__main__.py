"""``python -m fastpref …`` runs the command line (:mod:`fastpref.cli`)."""

from fastpref.cli import main

raise SystemExit(main())
