"""The head: label logits refined on the feature grid, then against the image.

The fourth step of the pipeline, cheap next to the backbone and the only one
that depends on the labels. :mod:`.refinement` runs prompt denoising
(:mod:`.prompt_denoising`: labels absent from the image are dropped) then key
smoothing (:mod:`.key_smoothing`: each location's scores averaged with those
of locations whose keys are alike); :mod:`.pamr` refines the upsampled
probabilities against the image's colours.
"""
