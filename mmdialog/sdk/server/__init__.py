"""``mmdialog serve``: the app (``app.py``), its routes (``routes.py``,
``completions.py``), who may ask (``guard.py``), what a request may hold
(``limits.py``, ``schema.py``), the queue (``batching.py``), the shared
photos (``photos.py``), uvicorn with its connection guards (``serving.py``)
and the chat page (``static/chat.html``)."""
from mmdialog.sdk.server.app import create_app
from mmdialog.sdk.server.limits import Limits

__all__ = ["Limits", "create_app"]
