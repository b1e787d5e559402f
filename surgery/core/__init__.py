"""Library-free core: recipe, modules, bake, reference, discovery, parity. Imports no backend."""
