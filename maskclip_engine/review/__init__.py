"""Annotation review: which accepted annotations are probably wrong, and a report a person reads.

:mod:`.confident_learning` gives every annotated image out-of-sample class
probabilities (students that never trained on it) and flags the pixels where
the annotation disagrees with them confidently; :mod:`.report` writes a review
as ``review.json``, an HTML page and pictures. Built on the students and the
segmenter; nothing below imports it.
"""
