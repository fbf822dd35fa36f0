"""``python -m mmdialog`` is the ``mmdialog`` command."""
from mmdialog.sdk.cli import main

main()
