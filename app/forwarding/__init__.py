"""Forwarding: every status change and reply pushed to the user's own webhook endpoints.

- events.py      what the write path hands over, stored in the callback's own transaction
- endpoints.py   endpoints: create, list, rotate secrets, replay (SQL, no HTTP)
- deliveries.py  the deliveries listing and manual retry (SQL, no HTTP)
- queue.py       the dispatcher's SQL: claim with a lease, record outcomes
- dispatcher.py  the Forwarder: claims due deliveries and sends them, per-endpoint lanes
- signing.py     Standard Webhooks secrets and signatures
- urls.py / guard.py   which targets are allowed, checked at creation and at connect time
- api.py / cli.py / schemas.py   the REST routes, the `dlr endpoints|deliveries` commands
"""
