"""Run lightning-rlhf from a checkout: ``python cli.py fit -c configs/<method>/tiny.yaml``."""

from lightning_rlhf.cli import main

if __name__ == "__main__":
    main()
