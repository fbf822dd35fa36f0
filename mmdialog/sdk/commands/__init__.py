"""The commands of ``mmdialog``; ``sdk/cli.py`` puts them in one table."""
