"""``mmdialog serve``: the app and its routes (``app.py``), who may ask and
what a request may hold (``limits.py``: Host/Origin/API-key guard, size
limits, image checks) and the chat page (``static/chat.html``)."""
from mmdialog.sdk.server.app import create_app
from mmdialog.sdk.server.limits import Limits

__all__ = ["Limits", "create_app"]
