"""FTP fine-grained token routing (arXiv 2412.11494), served inside vLLM."""

__version__ = "0.1.0"
