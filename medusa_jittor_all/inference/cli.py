"""Chat through the full-Jittor backend (Jittor Llama + Jittor heads); same flags and commands as
``medusa.inference.cli``."""
import sys

from medusa.inference.cli import main

if __name__ == "__main__":
    sys.exit(main(backend="jittor"))
