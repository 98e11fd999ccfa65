"""``python -m server [vLLM flags]``: the same as ``ftp-vllm serve``."""

import sys

from server.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
