"""What the product speaks, with no HTTP and no database: the provider's vocabulary and the
notification it makes, the message as every route shows it, webhook secrets and signatures,
and which forwarding targets are allowed. Everything else builds on it."""
