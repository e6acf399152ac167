"""The ``mtlkit`` command line, YAML configs and the demo."""
