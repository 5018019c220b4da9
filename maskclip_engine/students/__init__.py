"""MaskCLIP+ students: networks trained on MaskCLIP's pseudo-labels and the project's own annotations.

``network`` (the architectures), ``checkpoint`` (files), ``training`` (the
training loop), ``augment``, ``serving`` (segmenting with a student),
``registry`` (a project's versions and the active one) and ``gate`` (whether
a candidate beats the model it would replace).
"""
