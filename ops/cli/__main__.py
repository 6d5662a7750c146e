"""``python -m ops.cli`` runs the gantry CLI."""

from ops.cli.main import main

main()
