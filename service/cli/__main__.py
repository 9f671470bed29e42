"""``python -m service.cli``: the ``snipserve`` command."""

from service.cli import main

raise SystemExit(main())
