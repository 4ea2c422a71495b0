from cir.cli import main

raise SystemExit(main())
