import sys

from prism_deploy.cli.main import main

sys.exit(main())
