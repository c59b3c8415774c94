"""doorman: the front door of the mesh; routes every call to a tier and records it."""
