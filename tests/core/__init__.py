"""The method on organisms: discovery, the hooked reference, baking, parity, the judge, eager cost, memory."""
