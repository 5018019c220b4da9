"""Measured quality: mIoU of configurations on labelled data, the published set-ups, and agreements.

:mod:`.evaluate` scores configurations on a VOC-layout dataset (or samples
built in code) with the metric code of :mod:`maskclip_engine.miou`;
:mod:`.harness` is the evaluation head of the later training-free methods;
:mod:`.protocols` holds published set-ups as data. :mod:`.precision_agreement`
measures how far a faster configuration agrees with a float32 reference, and
:mod:`.annotation_agreement` how much of a proposal an annotator kept.
"""
