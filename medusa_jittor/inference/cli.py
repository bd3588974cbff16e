"""Chat through the hybrid backend (PyTorch backbone, Jittor heads); same flags as ``medusa.inference.cli``."""
import sys

from medusa.inference.cli import main

if __name__ == "__main__":
    sys.exit(main(backend="hybrid"))
