"""Dense features: per-location embeddings in CLIP's joint space, in each dense mode.

The second step of the pipeline. :mod:`.modes` changes the backbone's last
block so that every location keeps its own embedding (MaskCLIP, and the
later training-free modes SCLIP, ClearCLIP and NACLIP) and returns the last
block's keys that key smoothing needs; :mod:`.calibrated` adds SC-CLIP's and
SFP's calibrated last block, with :mod:`.outlier_tokens` finding and filling
the tokens those methods treat as outliers. Built on :mod:`maskclip_engine.backbone`.
"""
