from diffnas.cli import main

raise SystemExit(main())
