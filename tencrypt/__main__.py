from tencrypt.cli import main

raise SystemExit(main())
