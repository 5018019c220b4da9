"""Talking to Label Studio, shared by the HTTP backend and the workers.

Settings, authentication, image fetching, label configs, brush and polygon
results, predictions for tasks, project export as training data, and the
queue's public calls. It builds on ``maskclip_engine``; ``backend`` and
``workers`` build on it and never on each other.
"""
