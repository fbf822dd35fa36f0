"""perceiver ``caption``: the pipeline baseline. A photo enters the dialogue as
its caption text, ``[img] caption [/img]`` (as in the reference code, where
context photos are their PhotoChat descriptions). No pixels, no gradient."""
from __future__ import annotations

from mmdialog.core.data.schema import Photo
from mmdialog.core.errors import DataError
from mmdialog.core.interfaces import Perceiver, PluginOptions


class CaptionOptions(PluginOptions):
    pass


class CaptionPerceiver(Perceiver):
    Options = CaptionOptions
    kind = "text"

    def __init__(self, options: CaptionOptions) -> None:
        super().__init__()

    def parameter_groups(self) -> dict:
        return {}

    def caption(self, photo: Photo) -> str:
        if not photo.description:
            raise DataError("the caption perceiver needs a description for every photo "
                                "(use --perceiver qformer to read raw pixels)")
        return photo.description
