"""The callback receiver: the provider's delivery, seen and reply notifications on /dlr."""
