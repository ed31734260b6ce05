from s3mount.cli import main

raise SystemExit(main())
