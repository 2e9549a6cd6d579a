import sys

from grpc_server.server import main

sys.exit(main())
