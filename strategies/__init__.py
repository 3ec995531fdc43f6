"""moectl's built-in strategies, one file each. They import only the core (`moectl`) and are found
the way third-party strategies are: through the `moectl.strategies` entry points in pyproject.toml."""
