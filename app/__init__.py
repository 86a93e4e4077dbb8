"""DLR receiver: delivery reports in, status out, messages sent through the provider."""
