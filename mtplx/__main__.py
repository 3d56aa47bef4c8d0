from mtplx.cli.main import entry

raise SystemExit(entry())
