"""The service API: ``.proto`` files and their generated Python stubs (regenerate with ``protos/generate.sh``)."""
