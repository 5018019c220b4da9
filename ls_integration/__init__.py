"""Talking to Label Studio, shared by the HTTP backend and the workers.

Label configs, authentication and which Label Studio a project's work talks to,
image fetching, brush RLE and polygon regions, model versions, predictions for
tasks, smart tools, and a project's annotations as training data. It builds on
``maskclip_engine`` and ``maskclip_service``; ``backend`` and ``workers``
build on it and never on each other.
"""
