"""One image's backbone output, and where it is kept so the backbone runs once per image.

The third step of the pipeline. :mod:`.image_features` is what the backbone
produces for an image (label-independent dense features and keys, window by
window) and the :class:`~.image_features.FeatureKey` naming it;
:mod:`.cache` keeps recent ones in memory, :mod:`.store` on disk for every
process that shares the folder, and :mod:`.source` looks in memory, then the
store, then runs the backbone. :mod:`.dense_state` is the grid state that
smart-tool regions are computed from.
"""
