from stagewise.cli import main

raise SystemExit(main())
