"""The Label Studio ML backend: MaskCLIP pre-annotations over HTTP."""
