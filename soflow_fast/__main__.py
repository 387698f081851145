import logging
import os
import sys

from .cli import main

code = main()
if "WORLD_SIZE" in os.environ:
    # A torchrun worker whose work is done and flushed skips the interpreter's teardown: torch.distributed's
    # background threads intermittently abort there ("terminate called without an active exception"), which
    # torchrun would report as a failed run although everything was written.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
