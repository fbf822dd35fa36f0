"""``mmdialog serve``: the app and its routes (``app.py``), request limits
(``limits.py``) and the chat page (``static/chat.html``)."""
from mmdialog.sdk.server.app import create_app
from mmdialog.sdk.server.limits import Limits

__all__ = ["Limits", "create_app"]
