"""``python -m vsockrpc.vhost``: run the userspace vsock device (see :mod:`.command`)."""

import sys

from vsockrpc.vhost.command import main

sys.exit(main())
