"""The frozen CLIP model: building it, its precision, its ViT blocks and its text tower.

Everything that knows about open_clip lives here: :mod:`.loading` builds a
model from a :class:`~maskclip_engine.config.ModelSpec` (the one place that
knows about weights), :mod:`.precision` decides the image tower's precision,
:mod:`.vit_blocks` runs the patch embedding and transformer blocks the dense
modes build on, and :mod:`.text` turns labels into prompt-averaged text
embeddings (:mod:`.templates` holds the prompts, :mod:`.short_context` encodes
each at its real token length). The first step of the pipeline: nothing here
imports the rest of the engine.
"""
