from mtplx.cli.main import main

raise SystemExit(main())
