"""Built-in destinations, installed as ``router_plugins``. Each folder is one destination,
written and registered exactly as a third-party plugin package would be."""
