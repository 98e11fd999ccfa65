"""``python -m ftp_vllm.server [vLLM flags]``: the same as ``ftp-vllm serve``."""

import sys

from ftp_vllm.server.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
