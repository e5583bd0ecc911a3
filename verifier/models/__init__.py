"""Speaker models: their description (ModelSpec), conversion to ONNX without torch, and provisioning."""
