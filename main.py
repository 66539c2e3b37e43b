"""BOOST on Lightning: ``python main.py fit|validate|predict --config configs/quickstart.yaml`` (see --help)."""

from boost_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
