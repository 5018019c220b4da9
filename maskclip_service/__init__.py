"""The service runtime the HTTP backend and the workers both run on, none of it about Label Studio.

Settings from the environment, the device lock, Prometheus metrics, text
warm-ups, and the job queue: training jobs, pre-annotation runs and their
chunk leases, the embedded Redis, and the job paths queued work names. It
builds on ``maskclip_engine``; ``ls_integration``, ``backend`` and
``workers`` build on it.
"""
