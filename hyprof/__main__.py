from hyprof.cli import main

raise SystemExit(main())
